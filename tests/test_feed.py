"""The event feed's wake-ups: while its LISTEN connection is up, an idle
follower waits for a wake-up and runs no query of its own (the feed checks
the horizon once for all of them); while it is down, followers look again
every poll interval themselves."""

from __future__ import annotations

import asyncio

import asyncpg

from service.db.pool import connect_direct
from service.events.feed import EventFeed
from service.settings import Settings

POLL = 0.05  # seconds; a follower that polled would wake 40 times in 2 s


async def test_idle_followers_wait_on_the_listener_and_poll_only_without_it(
    service_env, admin_db, app
):
    settings = Settings.from_env(service_env)
    listeners: list[asyncpg.Connection] = []
    refuse = asyncio.Event()

    async def connect() -> asyncpg.Connection:
        if refuse.is_set():
            raise OSError("refused by the test")
        conn = await connect_direct(settings)
        listeners.append(conn)
        return conn

    feed = EventFeed(connect, poll_interval=POLL)
    await feed.start()
    try:
        # Connecting wakes everyone once (anything may have been missed).
        await asyncio.wait_for(feed.wait(0), 10)
        # For 40 poll intervals, a wait ends only for a wake-up (the horizon
        # may move as earlier tests' writers finish), never for the interval.
        loop = asyncio.get_running_loop()
        until = loop.time() + 40 * POLL
        ended_unwoken = 0
        while (left := until - loop.time()) > 0:
            seen = feed.generation
            try:
                await asyncio.wait_for(feed.wait(seen), left)
            except TimeoutError:
                break
            ended_unwoken += feed.generation == seen
        assert ended_unwoken == 0
        seen = feed.generation

        # The listener is lost: followers are woken, then poll by themselves.
        refuse.set()
        await admin_db.execute("SELECT pg_terminate_backend($1)", listeners[0].get_server_pid())
        await asyncio.wait_for(feed.wait(seen), 10)
        seen = feed.generation
        await asyncio.wait_for(feed.wait(seen), 40 * POLL)
        assert feed.generation == seen  # it returned for the poll interval, not a wake-up
    finally:
        await feed.close()
