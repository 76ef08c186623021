"""Channels that open a TCP connection of their own: by default gRPC shares
one connection among a process's channels to the same address, and tests
that count connections (workers, acceptors, certificate rotation) need
each channel to make its own (and its own TLS handshake)."""

from __future__ import annotations

import grpc

from orderstream.orders.v1 import order_service_pb2_grpc
from tests.support.requests import create_request

OWN_CONNECTION = (("grpc.use_local_subchannel_pool", 1),)


def own_channel(port: int) -> grpc.aio.Channel:
    """A plain-text channel to 127.0.0.1:`port` on a connection of its own."""
    return grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=OWN_CONNECTION)


async def create_on_own_connection(port: int) -> int:
    """CreateOrder on a new connection; the new order's id."""
    async with own_channel(port) as channel:
        order = await order_service_pb2_grpc.OrderServiceStub(channel).CreateOrder(
            create_request(), timeout=10
        )
    return int(order.id)
