"""Retention: the oldest events are deleted once older than
ORDERSTREAM_EVENT_RETENTION, in bounded batches, and nobody who needed
them is silently skipped past the gap (docs/streams.md#retention).

The feed's lower end is `feed_retention.truncated_upto`
(migrations/0009_event_retention.sql): every event up to it is gone. Each
batch is one short transaction that locks that row (SKIP LOCKED: replicas
and workers all run this, and none waits for another), deletes the oldest
events after it in id order for as long as their `time` is past the window
(an event with a later `time` holds back those after it, so the feed's
lower end stays one id), at most `BATCH_ROWS` of them, and moves the row to
the last one deleted.

What is never deleted:
- events at or past the safe horizon this process saw one round earlier:
  an event is final, and read into every live tail, for at least a round
  before it can go, even one written with an old `time`;
- with ORDERSTREAM_RETENTION_HOLD_FOR_CONSUMERS, events after the slowest
  durable consumer's acknowledged position.

Readers check the lower end after each page they read from the table
(`check_retained`): a page read after a batch committed may lack events,
and a reader whose position is below the lower end gets OUT_OF_RANGE
naming the earliest retained event, never a silent skip. (A page read just
before the batch committed was whole, but is refused all the same: the
check cannot tell the two apart, and the next page would have the gap.)
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import grpc

from service.errors import Reason, ServiceError
from service.events import sql

log = logging.getLogger(__name__)

BATCH_ROWS = 5000
MAX_BATCHES = 100

TRUNCATED_UPTO = "SELECT truncated_upto FROM feed_retention"
_FIRST_RETAINED = "SELECT min(id) FROM events WHERE id > $1"

# $1 the lower end, $2 the first id not to delete, $3 the window in
# seconds, $4 the batch size: the last id of the run of expired events
# right after the lower end (NULL when the first one is not expired).
_LAST_EXPIRED = """
SELECT CASE WHEN bool_and(expired) THEN max(id)
            ELSE min(id) FILTER (WHERE NOT expired) - 1 END
FROM (
    SELECT id, time < now() - make_interval(secs => $3) AS expired
    FROM events WHERE id > $1 AND id < $2
    ORDER BY id LIMIT $4
) AS oldest
"""
_SLOWEST_CONSUMER = "SELECT min(position) FROM consumers"


async def check_retained(query: Callable[..., Awaitable[Any]], position: int) -> None:
    """Raises OUT_OF_RANGE if events after `position` may have been deleted;
    `query(statement, *args)` runs one statement and returns its first
    value, on whichever connection the caller reads with."""
    truncated = int(await query(TRUNCATED_UPTO))
    if position < truncated:
        first = await query(_FIRST_RETAINED, truncated)
        raise expired(position, truncated, first)


def expired(position: int, truncated: int, first: int | None) -> ServiceError:
    first_id = truncated + 1 if first is None else int(first)
    return ServiceError(
        grpc.StatusCode.OUT_OF_RANGE,
        Reason.EVENTS_EXPIRED,
        f"events after position {position} were deleted by retention; the earliest retained "
        f"event is {first_id}: resume after {truncated} (with after_id, or ResetConsumer)",
        metadata={
            "position": str(position),
            "first_id": str(first_id),
            "resume_after": str(truncated),
        },
    )


class Retention:
    """Deletes expired events, a round every interval, from one process."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        keep: float,
        hold_for_consumers: bool,
        batch_rows: int = BATCH_ROWS,
        timeout: float = 30.0,
    ) -> None:
        self._pool = pool
        self._keep = keep
        self._hold = hold_for_consumers
        self._batch_rows = batch_rows
        self._timeout = timeout
        # The safe horizon at the previous round: nothing at or past it goes.
        self._previous_horizon: int | None = None

    async def run_once(self) -> int:
        """One round: the events deleted."""
        async with self._pool.acquire(timeout=self._timeout) as conn:
            horizon = int(await conn.fetchval(sql.SAFE_HORIZON, timeout=self._timeout))
            below, self._previous_horizon = self._previous_horizon, horizon
            if below is None:
                return 0
            if self._hold:
                slowest = await conn.fetchval(_SLOWEST_CONSUMER, timeout=self._timeout)
                if slowest is not None:
                    below = min(below, int(slowest) + 1)
        deleted = 0
        for _ in range(MAX_BATCHES):
            count = await self._batch(below)
            deleted += count
            if count < self._batch_rows:
                break
        return deleted

    async def _batch(self, below: int) -> int:
        # A pooled connection per batch, taken like a call's, and one short
        # transaction: fine behind a transaction-pooling PgBouncer.
        async with self._pool.acquire(timeout=self._timeout) as conn, conn.transaction():
            upto = await conn.fetchval(
                "SELECT truncated_upto FROM feed_retention FOR UPDATE SKIP LOCKED",
                timeout=self._timeout,
            )
            if upto is None:  # another process is deleting
                return 0
            last = await conn.fetchval(
                _LAST_EXPIRED, upto, below, self._keep, self._batch_rows, timeout=self._timeout
            )
            if last is None or last <= upto:
                return 0
            status = await conn.execute(
                "DELETE FROM events WHERE id > $1 AND id <= $2", upto, last, timeout=self._timeout
            )
            await conn.execute(
                "UPDATE feed_retention SET truncated_upto = $1", last, timeout=self._timeout
            )
        return int(status.rsplit(" ", 1)[1])

    async def run_forever(self, interval: float) -> None:
        """A round every `interval` seconds until cancelled; one that fails
        is logged and the next tries again."""
        while True:
            try:
                deleted = await self.run_once()
            except Exception as exc:  # the next round retries; the task must not die
                log.warning(
                    "expired events not deleted this round",
                    extra={"error": f"{type(exc).__name__}: {exc}"},
                )
            else:
                if deleted:
                    log.info("deleted expired events", extra={"deleted": deleted})
            await asyncio.sleep(interval)
