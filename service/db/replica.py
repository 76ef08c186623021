"""Whether the read replica may serve reads: reachable, and not too far behind.

Lag is measured in WAL, not in clock time of the last replayed commit:
`now() - pg_last_xact_replay_timestamp()` grows on a replica that is fully
caught up with an idle primary, and would send reads away from a perfectly
good replica. Instead, every check reads the primary's WAL position
(`pg_current_wal_insert_lsn()`: everything written, flushed or not) and
remembers when it was first seen, then reads
how far the replica has replayed (`pg_last_wal_replay_lsn()`). The lag is
the age of the oldest remembered primary position the replica has not
replayed yet: "the replica is missing something the primary had written
`lag` seconds ago". An idle primary writes nothing, so a caught-up replica
stays at 0; a replica whose replay stopped falls behind as soon as the
primary writes anything. The measure is as coarse as the check interval,
and uses one clock (this process's), so clock skew between servers cannot
fool it.

A replica that cannot be reached, or lags more than `max_lag`, is marked
down; so is one that a call found broken (`mark_down`), so calls do not
each pay a connection timeout. Only this periodic check marks it up again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque

import asyncpg

from service.db.pool import DATABASE_FAILURES

log = logging.getLogger(__name__)

PRIMARY_POSITION = "SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '0/0')::bigint"
# A server that is not in recovery (say, the primary itself, named as the
# replica in development) has replayed everything it has.
REPLICA_POSITION = """
SELECT pg_wal_lsn_diff(
    CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END,
    '0/0')::bigint
"""


class ReplicaMonitor:
    def __init__(
        self,
        primary: asyncpg.Pool,
        replica: asyncpg.Pool,
        *,
        max_lag: float,
        interval: float,
        timeout: float,
    ) -> None:
        self._primary = primary
        self.pool = replica
        self.max_lag = max_lag
        self._interval = interval
        self._timeout = timeout
        self.usable = False  # until the first check says otherwise
        self.lag: float | None = None  # seconds; None while unreachable
        self.reason = "not checked yet"
        # (first seen, primary WAL position), positions strictly increasing.
        self._positions: deque[tuple[float, int]] = deque()
        self._stopped = asyncio.Event()

    async def mark_down(self, reason: str) -> None:
        """A call found the replica broken: reads go to the primary until the
        next check finds it healthy again."""
        self.lag = None
        self._set(False, reason)
        # Connections to a restarted server may look open; start afresh.
        await self.pool.expire_connections()

    async def check(self) -> None:
        try:
            primary_at = await self._position(self._primary, PRIMARY_POSITION)
        except DATABASE_FAILURES:
            # Says nothing about the replica; the primary's health reports
            # it. But the positions seen so far may be of a primary that is
            # gone: after a failover the new one's WAL goes on from what its
            # standby had replayed, behind them, and a replica measured
            # against them would lag forever.
            self._positions.clear()
            return
        now = asyncio.get_running_loop().time()
        try:
            replayed = await self._position(self.pool, REPLICA_POSITION)
        except DATABASE_FAILURES as exc:
            self.lag = None
            self._set(False, f"unreachable: {type(exc).__name__}")
            return
        if not self._positions or self._positions[-1][1] < primary_at:
            self._positions.append((now, primary_at))
        self.lag = self._lag(now, replayed)
        if self.lag > self.max_lag:
            self._set(False, f"lagging more than {self.max_lag:g}s behind the primary")
        else:
            self._set(True, "caught up")

    def _lag(self, now: float, replayed: int) -> float:
        positions = self._positions
        while positions and positions[0][1] <= replayed:
            positions.popleft()
        # Whether the lag exceeds max_lag depends only on the newest position
        # older than that: drop the ones before it, so a stuck replica does
        # not grow the queue forever (the lag then reads as at least max_lag).
        while len(positions) >= 2 and now - positions[1][0] > self.max_lag:
            positions.popleft()
        return now - positions[0][0] if positions else 0.0

    async def _position(self, pool: asyncpg.Pool, query: str) -> int:
        async with pool.acquire(timeout=self._timeout) as conn:
            value: int = await conn.fetchval(query, timeout=self._timeout)
            return value

    def _set(self, usable: bool, reason: str) -> None:
        changed = usable != self.usable
        self.usable, self.reason = usable, reason
        if changed and usable:
            log.info("read replica in use", extra={"lag_seconds": round(self.lag or 0.0, 3)})
        elif changed:
            log.warning("read replica not used: reads go to the primary", extra={"reason": reason})

    async def run(self) -> None:
        """Checks every interval until `stop`; the first check is immediate."""
        while not self._stopped.is_set():
            await self.check()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopped.wait(), self._interval)

    def stop(self) -> None:
        self._stopped.set()
