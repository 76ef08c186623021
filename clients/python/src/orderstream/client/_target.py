"""Accepts either a channel or a ready EventServiceStub where helpers need one."""

from __future__ import annotations

import grpc

from orderstream.events.v1.event_service_pb2_grpc import EventServiceStub


def event_stub(target: EventServiceStub | grpc.aio.Channel) -> EventServiceStub:
    if isinstance(target, grpc.aio.Channel):
        return EventServiceStub(target)
    return target


def backoff(attempt: int, *, initial: float = 0.1, maximum: float = 2.0) -> float:
    """Seconds to wait before retry number `attempt` (1-based), doubling."""
    return min(maximum, initial * 2.0 ** (attempt - 1))
