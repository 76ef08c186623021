"""Bounds on long-lived calls, so streams cannot starve unary calls: in
number (slots) and in time while their caller is quiet."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import grpc

from service.errors import Reason, ServiceError


class StreamSlots:
    """A fixed number of slots.

    `hold` takes one for a call that may be refused: when none is free it
    fails at once with RESOURCE_EXHAUSTED and RetryInfo rather than queueing
    the call. `queued` takes one for work that must not be refused (a
    follower's catch-up from the table): it waits its turn, first come first
    served, and ahead of nobody already waiting.
    """

    def __init__(self, limit: int, what: str) -> None:
        self._free = limit
        self._limit = limit
        self._what = what
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def in_use(self) -> int:
        return self._limit - self._free

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        if self._free <= 0 or self._waiters:
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
            self._release()

    @contextlib.asynccontextmanager
    async def queued(self) -> AsyncIterator[None]:
        if self._free <= 0 or self._waiters:
            turn = asyncio.get_running_loop().create_future()
            self._waiters.append(turn)
            try:
                await turn  # `_release` handed its slot straight to us
            except asyncio.CancelledError:
                if turn.done() and not turn.cancelled():
                    self._release()  # handed over just as we were cancelled
                else:
                    self._waiters.remove(turn)
                raise
        else:
            self._free -= 1
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        while self._waiters:
            turn = self._waiters.popleft()
            if not turn.done():
                turn.set_result(None)  # the slot passes on without being freed
                return
        self._free += 1


@dataclass(frozen=True)
class StreamTimeouts:
    """How long a stream waits on a quiet caller (docs/streams.md#quiet-callers):
    a client stream for its first message and between messages, a server
    stream for the reader to take a message."""

    first_message: float  # ORDERSTREAM_FIRST_MESSAGE_TIMEOUT
    client_idle: float  # ORDERSTREAM_CLIENT_IDLE_TIMEOUT
    write_stall: float  # ORDERSTREAM_WRITE_STALL_TIMEOUT
