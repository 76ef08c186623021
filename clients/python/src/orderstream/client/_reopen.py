"""`reopened`: StreamEvents calls one after another, the next opened when
one ends UNAVAILABLE; the loop that `stream_events` and `consume_events`
share, each with its own call."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Callable
from typing import TypeVar

import grpc

from orderstream.client._target import backoff, lost_connection

T = TypeVar("T")


async def reopened(
    open_stream: Callable[[], AsyncGenerator[T, None]], *, reconnects: int
) -> AsyncGenerator[T, None]:
    """Yields what `open_stream()` yields, one stream's worth at a time.

    A stream (one call, which its generator cancels when closed) that ends
    with a lost connection (UNAVAILABLE) is replaced by a new `open_stream()` after a backoff,
    up to `reconnects` times in a row without an item in between; it is up
    to `open_stream` to start where the last one stopped. Other errors are
    raised as they are.
    """
    failures = 0
    while True:
        try:
            # Closed as soon as the caller stops iterating, not when it is
            # collected: that is what cancels the stream's call.
            async with contextlib.aclosing(open_stream()) as stream:
                async for item in stream:
                    failures = 0
                    yield item
            return
        except grpc.aio.AioRpcError as error:
            if not lost_connection(error) or failures >= reconnects:
                raise
        failures += 1
        await asyncio.sleep(backoff(failures))
