"""Bounds on long-lived calls, so streams cannot starve unary calls: in
number (slots) and in time while their caller is quiet."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import grpc

from service.errors import Reason, ServiceError


class StreamSlots:
    """A fixed number of slots; taking one when none is free fails at once
    with RESOURCE_EXHAUSTED and RetryInfo rather than queueing the call."""

    def __init__(self, limit: int, what: str) -> None:
        self._free = limit
        self._limit = limit
        self._what = what

    @property
    def in_use(self) -> int:
        return self._limit - self._free

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        if self._free <= 0:
            raise ServiceError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                Reason.TOO_MANY_STREAMS,
                f"all {self._limit} {self._what} slots of this server are busy; retry later",
                retry_after=1.0,
                metadata={"limit": str(self._limit)},
            )
        self._free -= 1
        try:
            yield
        finally:
            self._free += 1


@dataclass(frozen=True)
class StreamTimeouts:
    """How long a stream waits on a quiet caller (docs/streams.md#quiet-callers):
    a client stream for its first message and between messages, a server
    stream for the reader to take a message."""

    first_message: float  # ORDERSTREAM_FIRST_MESSAGE_TIMEOUT
    client_idle: float  # ORDERSTREAM_CLIENT_IDLE_TIMEOUT
    write_stall: float  # ORDERSTREAM_WRITE_STALL_TIMEOUT
