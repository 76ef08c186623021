"""Wake-ups for followers of the event feed.

The events table is the source of truth; this only tells followers when it
is worth looking again. Commits made by this process wake local followers at
once and are announced to other replicas with NOTIFY, coalesced to at most
one per `notify_interval` and sent outside the writers' transactions (a
NOTIFY inside every write would serialise all commits on PostgreSQL's notify
queue lock). One LISTEN connection per process, opened directly rather than
taken from the pool (LISTEN is session state; behind a transaction-pooling
PgBouncer it needs a direct connection anyway), receives other replicas'
announcements. The same connection checks the feed's safe horizon every
`poll_interval` and wakes followers when it moved, which covers events
written by anything else: one query per process, however many followers.
While that connection is down, followers look again every `poll_interval`
themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import asyncpg

from service.db.pool import DATABASE_FAILURES
from service.events.sql import SAFE_HORIZON

log = logging.getLogger(__name__)

CHANNEL = "orderstream_events"


class EventFeed:
    def __init__(
        self,
        connect: Callable[[], Awaitable[asyncpg.Connection]],
        *,
        notify_interval: float = 0.02,
        poll_interval: float = 1.0,
    ) -> None:
        self._connect = connect
        self._notify_interval = notify_interval
        self.poll_interval = poll_interval
        self._generation = 0
        self._changed = asyncio.Event()
        self._announce_pending = asyncio.Event()
        self._closing = asyncio.Event()
        self._connected = False
        self._task: asyncio.Task[None] | None = None

    @property
    def generation(self) -> int:
        """Grows by one for every wake-up; followers remember the last seen."""
        return self._generation

    @property
    def closing(self) -> bool:
        return self._closing.is_set()

    def announce(self) -> None:
        """Called after this process committed events."""
        self._wake()
        self._announce_pending.set()

    async def wait(self, seen_generation: int) -> None:
        """Returns on a wake-up after `seen_generation` or on shutdown; while
        the listener is down, also after poll_interval."""
        if self._generation != seen_generation or self.closing:
            return
        # While the listener is up it checks the horizon for everyone;
        # losing it wakes every follower, which then polls by itself. Shutdown
        # is a wake-up too (`close`), so the one event covers it.
        timeout = None if self._connected else self.poll_interval
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)

    def _wake(self) -> None:
        self._generation += 1
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _on_notification(self, *_: object) -> None:
        self._wake()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._listen_and_announce(), name="event-feed")

    async def close(self) -> None:
        """Ends every follower's wait and the listener."""
        self._closing.set()
        self._wake()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _listen_and_announce(self) -> None:
        backoff = 0.1
        while not self.closing:
            try:
                conn = await self._connect()
            except DATABASE_FAILURES as exc:
                log.warning("event feed listener cannot connect: %s", type(exc).__name__)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.1
            lost = asyncio.Event()
            conn.add_termination_listener(lambda _, lost=lost: lost.set())
            try:
                await conn.add_listener(CHANNEL, self._on_notification)
                self._connected = True
                # Anything may have been missed while disconnected.
                self._wake()
                await self._announce_until_lost(conn, lost)
            except DATABASE_FAILURES as exc:
                log.warning("event feed listener lost its connection: %s", type(exc).__name__)
            finally:
                self._connected = False
                self._wake()  # followers fall back to polling themselves
                with contextlib.suppress(Exception):
                    await asyncio.shield(conn.close(timeout=2))

    async def _announce_until_lost(self, conn: asyncpg.Connection, lost: asyncio.Event) -> None:
        horizon = await conn.fetchval(SAFE_HORIZON, timeout=5)
        while True:
            pending = asyncio.ensure_future(self._announce_pending.wait())
            gone = asyncio.ensure_future(lost.wait())
            await asyncio.wait(
                (pending, gone), timeout=self.poll_interval, return_when=asyncio.FIRST_COMPLETED
            )
            pending.cancel()
            gone.cancel()
            if lost.is_set():
                return
            if self._announce_pending.is_set():
                self._announce_pending.clear()
                await conn.execute("SELECT pg_notify($1, '')", CHANNEL, timeout=5)
                await asyncio.sleep(self._notify_interval)
                continue
            moved = await conn.fetchval(SAFE_HORIZON, timeout=5)
            if moved != horizon:
                horizon = moved
                self._wake()
