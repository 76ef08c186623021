"""Forgets idempotency records once they are older than the window.

Every keyed write leaves a record: an order's `request_id`, a row of
`publish_requests`, `status_requests`, `uploads` or `imports`. A retry
within the window is answered from it; after the window the key is free
again (a repeat writes anew), and the tables stay the size of one window
of writes. Each statement removes at most `BATCH_ROWS` records, oldest
first, as its own short transaction, skipping rows another statement holds
(replicas and workers all run this; none waits for another), and a round
stops after `MAX_BATCHES` per table, so the work is bounded whatever the
backlog.
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg

log = logging.getLogger(__name__)

BATCH_ROWS = 1000
MAX_BATCHES = 100

# $1 the window in seconds, $2 the batch size. Orders stay: only their key
# is forgotten.
_FORGET = {
    "orders": """
UPDATE orders SET request_id = NULL, request_hash = NULL
WHERE id IN (
    SELECT id FROM orders
    WHERE request_id IS NOT NULL AND create_time < now() - make_interval(secs => $1)
    ORDER BY create_time LIMIT $2 FOR UPDATE SKIP LOCKED
)""",
    **{
        table: f"""
DELETE FROM {table}
WHERE {key} IN (
    SELECT {key} FROM {table}
    WHERE create_time < now() - make_interval(secs => $1)
    ORDER BY create_time LIMIT $2 FOR UPDATE SKIP LOCKED
)"""
        for table, key in (
            ("publish_requests", "request_id"),
            ("status_requests", "request_id"),
            ("uploads", "upload_id"),
            ("imports", "import_id"),
        )
    },
}


async def forget_expired(
    pool: asyncpg.Pool, window: float, *, batch_rows: int = BATCH_ROWS, timeout: float = 30.0
) -> dict[str, int]:
    """One round: the records forgotten, by table."""
    forgotten = dict.fromkeys(_FORGET, 0)
    for table, statement in _FORGET.items():
        for _ in range(MAX_BATCHES):
            # One pooled connection at a time, taken like a call's: a busy
            # pool delays a round rather than the calls.
            async with pool.acquire(timeout=timeout) as conn:
                status = await conn.execute(statement, window, batch_rows, timeout=timeout)
            count = int(status.rsplit(" ", 1)[1])
            forgotten[table] += count
            if count < batch_rows:
                break
    return forgotten


async def forget_expired_forever(pool: asyncpg.Pool, *, window: float, interval: float) -> None:
    """A round every `interval` seconds until cancelled; a round that fails
    (the database away, read-only during a failover) is logged and the next
    one tries again."""
    while True:
        await asyncio.sleep(interval)
        try:
            forgotten = await forget_expired(pool, window)
        except Exception as exc:  # the next round retries; the task must not die
            log.warning(
                "idempotency records not forgotten this round",
                extra={"error": f"{type(exc).__name__}: {exc}"},
            )
            continue
        if any(forgotten.values()):
            log.info("forgot expired idempotency records", extra={"forgotten": forgotten})
