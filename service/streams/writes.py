"""Server-stream writes bounded in time: a caller that stops reading (but
keeps its connection, so keepalive cannot tell) must not hold a stream
slot, a pooled connection and an open snapshot for ever.

`await context.write()` is the streams' back-pressure: it returns once gRPC
has room for the message, and blocks (measured with grpcio 1.85) once a few
MiB are buffered for a reader that stopped taking them. `StallBound` bounds
that wait. Past it the handler unwinds at once (slot, connection and
transaction come back) and the call ends UNAVAILABLE, reason READER_STALLED,
with RetryInfo and metadata `position`. The status is sent after the
messages already written, the stalled one included (gRPC keeps it), so a
reader that reads on receives all of them and then the status: `position`
is the last id of those messages, the id to resume after. How long the
status waits for that reader is bounded too (`ServiceError.status_wait`).

Why not `asyncio.timeout` around each write: it schedules and cancels a
timer per write, and a follower writes once per feed round. With 1,000
followers that was a quarter of the cost of fanning an event out
(bench/fanout.py; a bare grpc.aio write measured 23 µs, with the timeout
31 µs). A `StallBound` keeps one timer per stream that looks at the write
in progress when it fires and re-arms itself for the moment that write
would expire: a write costs two attribute stores, and a stall is still
noticed on time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager

import grpc

from service.errors import Reason, ServiceError


class StallBound:
    """The writes of one server stream, each bounded by `timeout` seconds
    (ORDERSTREAM_WRITE_STALL_TIMEOUT). Made by `stall_bound`, for the
    handler's own task."""

    __slots__ = ("_context", "_expired", "_loop", "_since", "_task", "_timeout", "_timer")

    def __init__(self, context: grpc.aio.ServicerContext, timeout: float) -> None:
        self._context = context
        self._timeout = timeout
        self._loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None, "a stream's writes run in its handler's task"
        self._task = task
        self._since: float | None = None  # when the write in progress began
        self._expired = False
        self._timer: asyncio.TimerHandle | None = self._loop.call_at(
            self._loop.time() + timeout, self._check
        )

    async def write(self, message: object, *, position: int) -> None:
        """Writes `message`, or raises READER_STALLED if the reader has not
        made room for it within the timeout. `position`: the last id
        `message` carries."""
        self._since = self._loop.time()
        try:
            await self._context.write(message)
        except asyncio.CancelledError:
            if self._expired and self._task.uncancel() == 0:
                raise reader_stalled(self._timeout, position) from None
            raise
        finally:
            self._since = None

    def _check(self) -> None:
        now = self._loop.time()
        since = self._since
        if since is not None and now >= since + self._timeout:
            # The write in progress is the one that stalled: end it. The
            # cancellation lands in `write`, the task's only wait while
            # `_since` is set.
            self._expired = True
            self._timer = None
            self._task.cancel()
            return
        # No write can expire before this: one that starts now, or the one
        # in progress at its own deadline.
        due = (now if since is None else since) + self._timeout
        self._timer = self._loop.call_at(due, self._check)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


@contextmanager
def stall_bound(context: grpc.aio.ServicerContext, timeout: float) -> Iterator[StallBound]:
    """The writes of the current handler's stream, for as long as it runs."""
    bound = StallBound(context, timeout)
    try:
        yield bound
    finally:
        bound.close()


def reader_stalled(timeout: float, position: int) -> ServiceError:
    # UNAVAILABLE, not DEADLINE_EXCEEDED: resuming at once after the last id
    # received is right, as after a lost connection or a shutdown, and the
    # Python client's `stream_events` does so on UNAVAILABLE.
    return ServiceError(
        grpc.StatusCode.UNAVAILABLE,
        Reason.READER_STALLED,
        f"the stream's reader took no message for {timeout:g} s "
        "(ORDERSTREAM_WRITE_STALL_TIMEOUT); resume after the last id received",
        retry_after=1.0,
        metadata={"position": str(position)},
        # The status waits behind the messages for as long as a write would.
        status_wait=timeout,
    )
