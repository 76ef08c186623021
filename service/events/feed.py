"""The feed's own connection: it learns when new events are final, reads
them once for the whole process into the shared tail, and tells the other
replicas.

The events table is the source of truth. One direct connection per process
(LISTEN is session state; behind a transaction-pooling PgBouncer it needs a
direct connection anyway) does all of the feed's reading:

- Wake-ups. Commits made by this process `announce` themselves; other
  replicas' commits arrive as NOTIFY; anything else (another writer) is
  found by looking again every `poll_interval`.
- Rounds. On a wake-up the connection computes the safe horizon once and
  reads the newly final range, unfiltered, in pages bounded in bytes, into
  the tail (service/events/tail.py), which wakes the followers. Wake-ups
  that arrive during a round, or within the round interval after it, make
  one more round: under a steady stream of commits followers are woken at
  most once per interval, however many commits there were. The base
  interval is `notify_interval` (20 ms), stretched with the number of
  followers up to `max_interval` (50 ms): each round costs every follower
  a message write, for little gain in delay. With a `pacer` (the service
  always has one), rounds come further apart while other work keeps the
  event loop busy (service/events/pacing.py).
- Announcements. This process's commits are sent to the other replicas as
  one NOTIFY per round, outside the writers' transactions (a NOTIFY inside
  every write would serialise all commits on PostgreSQL's notify queue lock),
  and every base interval while a paced round waits.

While the connection is down the tail stays where it was (nothing is lost:
it goes on from its horizon after reconnecting) and `live` is False, so
followers read the table themselves every `poll_interval` until it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import asyncpg

from service.db.pool import DATABASE_FAILURES
from service.events import sql
from service.events.pacing import RoundPacer
from service.events.retention import TRUNCATED_UPTO
from service.events.tail import Tail

log = logging.getLogger(__name__)

CHANNEL = "orderstream_events"
STATEMENT_TIMEOUT = 10.0  # seconds, for the feed's own statements


class EventFeed:
    def __init__(
        self,
        connect: Callable[[], Awaitable[asyncpg.Connection]],
        tail: Tail,
        *,
        notify_interval: float = 0.02,
        max_interval: float = 0.05,
        poll_interval: float = 1.0,
        pacer: RoundPacer | None = None,
    ) -> None:
        self._connect = connect
        self.tail = tail
        self._notify_interval = notify_interval
        self._max_interval = max_interval
        self._pacer = pacer  # None: every round at the base interval
        self.poll_interval = poll_interval
        self._work = asyncio.Event()
        self._announce_pending = False
        self._closing = False
        self._task: asyncio.Task[None] | None = None

    @property
    def closing(self) -> bool:
        return self._closing

    def announce(self) -> None:
        """Called after this process committed events."""
        self._announce_pending = True
        self._work.set()

    def _on_notification(self, *_: object) -> None:
        self._work.set()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._listen_and_read(), name="event-feed")

    async def close(self) -> None:
        """Ends every follower's wait and the connection."""
        self._closing = True
        self.tail.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _listen_and_read(self) -> None:
        backoff = 0.1
        while not self._closing:
            try:
                conn = await self._connect()
            except DATABASE_FAILURES as exc:
                log.warning("event feed cannot connect: %s", type(exc).__name__)
                await asyncio.sleep(backoff)
                # At most a second: a failover's promotion takes seconds,
                # and the feed should be back within one of it.
                backoff = min(backoff * 2, 1.0)
                continue
            backoff = 0.1
            lost = asyncio.Event()
            conn.add_termination_listener(lambda _, lost=lost: lost.set())
            try:
                await conn.add_listener(CHANNEL, self._on_notification)
                self.tail.start_at(await conn.fetchval(sql.SAFE_HORIZON, timeout=STATEMENT_TIMEOUT))
                self.tail.set_live(True)
                log.info("event feed listening")
                await self._read_until_lost(conn, lost)
            except DATABASE_FAILURES as exc:
                log.warning("event feed lost its connection: %s", type(exc).__name__)
            finally:
                self.tail.set_live(False)  # followers read the table themselves meanwhile
                with contextlib.suppress(Exception):
                    await asyncio.shield(conn.close(timeout=2))

    async def _read_until_lost(self, conn: asyncpg.Connection, lost: asyncio.Event) -> None:
        # Anything may have been committed while disconnected.
        self._work.set()
        while True:
            work = asyncio.ensure_future(self._work.wait())
            gone = asyncio.ensure_future(lost.wait())
            await asyncio.wait(
                (work, gone), timeout=self.poll_interval, return_when=asyncio.FIRST_COMPLETED
            )
            work.cancel()
            gone.cancel()
            if lost.is_set():
                return
            self._work.clear()
            await self._announce(conn)
            await self._read_new_events(conn)
            base = self._base_interval()
            await self._pause(conn, self._paced(base), base)

    async def _announce(self, conn: asyncpg.Connection) -> None:
        """Tells the other replicas of this process's commits, if any since
        the last time."""
        if self._announce_pending:
            self._announce_pending = False
            await conn.execute("SELECT pg_notify($1, '')", CHANNEL, timeout=STATEMENT_TIMEOUT)

    async def _pause(self, conn: asyncpg.Connection, interval: float, base: float) -> None:
        """Waits `interval` before the next round, which coalesces the
        wake-ups of a steady stream of commits. Meanwhile this process's
        commits are still announced every `base`: a round paced for this
        process's load must not hold back the other replicas' followers."""
        loop = asyncio.get_running_loop()
        until = loop.time() + interval
        while (left := until - loop.time()) > 0:
            await asyncio.sleep(min(left, base))
            await self._announce(conn)

    def _paced(self, base: float) -> float:
        """The interval after this round. The pacer hears of every round,
        so that each fan-out it measures starts at the round that woke it;
        with nobody following there is nothing to pace."""
        if self._pacer is None:
            return base
        paced = self._pacer.round_made(self.tail.settled_at, base)
        return paced if self.tail.followers else base

    def _base_interval(self) -> float:
        """20 ms up to 400 followers, then 50 µs more per follower, up to
        `max_interval` (from 1,000 followers on)."""
        stretched = self.tail.followers * 0.00005
        return min(self._max_interval, max(self._notify_interval, stretched))

    async def _read_new_events(self, conn: asyncpg.Connection) -> None:
        """One round: the new horizon, then every event below it not read
        yet, page by page into the tail."""
        tail = self.tail
        horizon: int = await conn.fetchval(sql.SAFE_HORIZON, timeout=STATEMENT_TIMEOUT)
        if not tail.followers:
            if horizon > tail.horizon:
                tail.skip_to(horizon)
            return
        position = tail.horizon - 1
        query = sql.events_page(types=sql.Types.ANY, with_subject=False)
        limit = sql.PAGE_ROWS
        while position < horizon - 1:
            rows = await conn.fetch(
                query, position, horizon, limit, sql.PAGE_BYTES, timeout=STATEMENT_TIMEOUT
            )
            # Events after `position` deleted by retention before this read
            # (a connection down for longer than a retention round): the
            # followers behind the gap are told, not skipped past it.
            truncated = await conn.fetchval(TRUNCATED_UPTO, timeout=STATEMENT_TIMEOUT)
            if truncated > position:
                tail.truncated(truncated)
            cut = sql.page_is_cut(rows, limit)
            upto = rows[-1][0] if cut else horizon - 1
            tail.append(position, upto, rows)
            position = upto
            limit = sql.next_limit(rows, limit)
