"""Calls a scenario holds open while it injects a fault: a server stream
paused after its first message, a client stream the test feeds message by
message, and a health Watch that records every status it is sent."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.faults.cluster import Admin

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class PausedStream:
    """A server stream read one message, then left alone: the client's
    flow-control window fills and the server waits, its cursor half read."""

    def __init__(self, call: Any, rows: str) -> None:
        self._call = call
        self._rows = rows  # "events" or "orders"
        self.ids: list[int] = []

    async def first(self) -> None:
        async with asyncio.timeout(30):
            message = await self._call.read()
        assert message is not grpc.aio.EOF, "the stream ended before its first message"
        self.ids.extend(row.id for row in getattr(message, self._rows))

    async def finish(self, timeout: float = 60) -> grpc.StatusCode:
        """Reads to the end; returns the status the stream ended with."""
        async with asyncio.timeout(timeout):
            try:
                while (message := await self._call.read()) is not grpc.aio.EOF:
                    self.ids.extend(row.id for row in getattr(message, self._rows))
            except grpc.aio.AioRpcError as error:
                return error.code()
            return await self._call.code()

    def cancel(self) -> None:
        self._call.cancel()


def ended_honestly(code: grpc.StatusCode, got: Sequence[int], expected: Sequence[int]) -> None:
    """A stream that ends OK has delivered everything; one that did not
    deliver everything ends with an error that says so, never OK."""
    if code == grpc.StatusCode.OK:
        assert list(got) == list(expected), f"OK after {len(got)} of {len(expected)} rows"
    else:
        assert list(got) == list(expected[: len(got)]), "rows out of order or duplicated"


class FedStream:
    """A client-streaming call whose messages the test sends one by one."""

    def __init__(self, method: Any, *, timeout: float = 60) -> None:
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._sent = 0
        self._written = 0
        self._progress = asyncio.Event()
        self.call = method(self._requests(), timeout=timeout)

    async def _requests(self) -> AsyncIterator[Any]:
        while (message := await self._queue.get()) is not None:
            yield message
            # grpc.aio asks for the next message only once it has written
            # this one to the transport.
            self._written += 1
            self._progress.set()

    def send(self, *messages: Any) -> None:
        for message in messages:
            self._sent += 1
            self._queue.put_nowait(message)

    async def written(self, timeout: float = 30) -> None:
        """Waits until every message sent so far is on its way to the
        server, not just queued in this process."""
        async with asyncio.timeout(timeout):
            while self._written < self._sent:
                self._progress.clear()
                await self._progress.wait()

    async def close(self, timeout: float = 60) -> tuple[grpc.StatusCode, Any]:
        """Half-closes and waits for the answer: (status, response or None)."""
        self._queue.put_nowait(None)
        async with asyncio.timeout(timeout):
            try:
                return grpc.StatusCode.OK, await self.call
            except grpc.aio.AioRpcError as error:
                return error.code(), None


async def copy_running(admin: Admin) -> bool:
    return any(
        row["state"] == "active" and (row["query"] or "").startswith("COPY")
        for row in await admin.service_backends()
    )


class HealthWatch:
    """Every status the server's health Watch stream sends, in order."""

    def __init__(self, stub: health_pb2_grpc.HealthStub) -> None:
        self.statuses: list[int] = []
        self._changed = asyncio.Event()
        self._call = stub.Watch(health_pb2.HealthCheckRequest(service=""))
        self._task = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
            async for response in self._call:
                self.statuses.append(response.status)
                self._changed.set()

    async def saw(self, *sequence: int, timeout: float = 60) -> None:
        """Waits until the statuses sent so far contain `sequence` in order."""
        try:
            async with asyncio.timeout(timeout):
                while not _contains_in_order(self.statuses, sequence):
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            ended = f", the watch ended: {self._task.exception()!r}" if self._task.done() else ""
            raise AssertionError(
                f"health never went {sequence} within {timeout}s; it sent {self.statuses}{ended}"
            ) from None

    async def close(self) -> None:
        self._call.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


def _contains_in_order(seen: Sequence[int], wanted: Sequence[int]) -> bool:
    position = 0
    for status in seen:
        if position < len(wanted) and status == wanted[position]:
            position += 1
    return position == len(wanted)


async def unary_loop(call: Any, stop: asyncio.Event) -> list[grpc.StatusCode]:
    """Repeats a unary call until `stop`; returns every status seen."""
    codes = []
    while not stop.is_set():
        try:
            await call()
            codes.append(grpc.StatusCode.OK)
        except grpc.aio.AioRpcError as error:
            codes.append(error.code())
            await asyncio.sleep(0.05)  # a client backing off after an error
    return codes
