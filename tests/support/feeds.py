"""An event feed (service/events/feed.py) of a test's own, on its own
connection, for tests of the feed, its tail and its pacing."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg

from service.events.feed import EventFeed
from service.events.tail import Tail
from tests.support.polling import eventually


async def holds(value: bool) -> bool:
    """`value` as the awaitable check `eventually` polls."""
    return value


@contextlib.asynccontextmanager
async def running_feed(
    connect: Callable[[], Awaitable[asyncpg.Connection]], tail: Tail, **options: Any
) -> AsyncIterator[EventFeed]:
    """The feed, once its connection listens and the tail has a horizon."""
    feed = EventFeed(connect, tail, **options)
    await feed.start()
    try:
        await eventually(lambda: holds(tail.live and tail.ready), what="the feed to connect")
        yield feed
    finally:
        await feed.close()
