"""Accepts either a channel or a ready stub where helpers need one; what
the helpers share besides (backoff, fresh idempotency keys)."""

from __future__ import annotations

import uuid

import grpc

from orderstream.events.v1.event_service_pb2_grpc import EventServiceStub
from orderstream.orders.v1.order_service_pb2_grpc import OrderServiceStub


def event_stub(target: EventServiceStub | grpc.aio.Channel) -> EventServiceStub:
    if isinstance(target, grpc.aio.Channel):
        return EventServiceStub(target)
    return target


def backoff(attempt: int, *, initial: float = 0.1, maximum: float = 2.0) -> float:
    """Seconds to wait before retry number `attempt` (1-based), doubling."""
    return min(maximum, initial * 2.0 ** (attempt - 1))


def order_stub(target: OrderServiceStub | grpc.aio.Channel) -> OrderServiceStub:
    if isinstance(target, grpc.aio.Channel):
        return OrderServiceStub(target)
    return target


def new_request_id(kind: str) -> str:
    """A fresh idempotency key, e.g. `publish-3f2a...`."""
    return f"{kind}-{uuid.uuid4().hex}"
