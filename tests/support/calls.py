"""Calls several test modules make the same way: publishing a batch of
events, reading a finite stream to its end, exporting orders."""

from __future__ import annotations

import json

import grpc

from orderstream.events.v1 import event_pb2, event_service_pb2
from orderstream.orders.v1 import order_pb2


def new_event(subject: str, n: int = 0) -> event_pb2.Event:
    return event_pb2.Event(
        type="test.streamed", source="/tests", subject=subject, json_payload=json.dumps({"n": n})
    )


async def publish(events, subject: str, count: int) -> list[int]:
    batch = [new_event(subject, n) for n in range(count)]
    response = await events.PublishEvents(event_service_pb2.PublishEventsRequest(events=batch))
    return list(response.ids)


async def read_all(call) -> tuple[list[event_pb2.Event], int]:
    """Every event of a finite stream, and how many messages carried them."""
    received, messages = [], 0
    while (response := await call.read()) is not grpc.aio.EOF:
        messages += 1
        received.extend(response.events)
    return received, messages


async def export_all(stub, request) -> tuple[list[order_pb2.Order], int]:
    orders, messages = [], 0
    call = stub.ExportOrders(request)
    while (response := await call.read()) is not grpc.aio.EOF:
        messages += 1
        orders.extend(response.orders)
    return orders, messages
