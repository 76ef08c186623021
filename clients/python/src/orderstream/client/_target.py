"""Accepts either a channel or a ready stub where helpers need one; what
the helpers share besides (backoff, what a lost connection looks like,
fresh idempotency keys)."""

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


# The status grpc.aio gives a call whose message it could not hand to its
# transport (grpc/aio/_call.py: a failed send batch sets it at once, and
# the call's real status, UNAVAILABLE, then comes too late to count): the
# connection went while a message was being written (CI's upload cut
# midway failed so once).
_WRITE_FAILED_LOCALLY = "Internal error from Core"


def lost_connection(error: grpc.aio.AioRpcError) -> bool:
    """Whether a call failed because its connection did (or its server went
    away): what the helpers that reconnect or re-send under a key retry."""
    code = error.code()
    if code == grpc.StatusCode.UNAVAILABLE:
        return True
    details: str | None = error.details()
    return code == grpc.StatusCode.INTERNAL and details == _WRITE_FAILED_LOCALLY


def order_stub(target: OrderServiceStub | grpc.aio.Channel) -> OrderServiceStub:
    if isinstance(target, grpc.aio.Channel):
        return OrderServiceStub(target)
    return target


def new_request_id(kind: str) -> str:
    """A fresh idempotency key, e.g. `publish-3f2a...`."""
    return f"{kind}-{uuid.uuid4().hex}"
