"""StreamEvents: the event feed in id order, never past a gap-free horizon.

History is read through a cursor inside one read-only REPEATABLE READ
transaction, up to the horizon computed just before it (see
migrations/0002_streaming.sql), so every id below it is final and a consumer
resuming from the last id it saw misses nothing. With `follow`, the stream
then hands over without gap or duplicate: the position moves to the horizon
even when no row below it matched the filters, and each later round reads
(position, new horizon) in bounded chunks on a briefly borrowed connection,
so an idle follower holds none. Rounds start when the feed wakes followers,
or every poll interval at the latest.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import asyncpg
import asyncpg.cursor
import grpc

from orderstream.events.v1 import event_service_pb2
from service.db.runner import Database
from service.errors import Reason, ServiceError
from service.events import sql
from service.events.feed import EventFeed
from service.events.wire import encode_events
from service.rpc.encoded import Encoded
from service.rpc.validation import Violations
from service.streams.limits import StreamSlots
from service.streams.writes import write_within

FETCH_ROWS = 5000  # rows per cursor round trip while reading history
FOLLOW_CHUNK_ROWS = 5000  # rows per query while following
MAX_TYPES = 100


def _checked(request: event_service_pb2.StreamEventsRequest) -> None:
    v = Violations()
    if request.after_id < 0:
        v.add("after_id", f"must be 0 (from the start) or a position, got {request.after_id}")
    if len(request.types) > MAX_TYPES:
        v.add("types", f"at most {MAX_TYPES} types, got {len(request.types)}")
    for n, kind in enumerate(request.types[:MAX_TYPES]):
        v.text(f"types[{n}]", kind, max_length=256)
    v.text("subject", request.subject, max_length=1024, required=False)
    v.raise_if_any()


class _Batches:
    """Packs events into response messages of at most `budget` bytes (or one
    event, if it alone is larger); each write waits for the reader
    (back-pressure). Rows become wire bytes in C (service/events/wire.c): the
    per-row cost is what bounds a stream's rate."""

    def __init__(
        self, context: grpc.aio.ServicerContext, budget: int, stall_timeout: float
    ) -> None:
        self._context = context
        self._budget = budget
        self._stall_timeout = stall_timeout
        self._chunks: list[bytes] = []
        self._size = 0
        self._rows = 0
        self._last = 0  # the last event id packed so far

    async def add(self, rows: Sequence[Any]) -> None:
        start, count = 0, len(rows)
        while start < count:
            chunk, end = encode_events(rows, start, self._size, self._budget)
            if chunk:
                self._chunks.append(chunk)
                self._size += len(chunk)
                self._rows += end - start
                self._last = rows[end - 1][0]
                start = end
            if start < count:  # row `start` did not fit: this message is full
                await self.flush()

    async def flush(self) -> None:
        if self._rows:
            # Runs of `events` entries joined are one StreamEventsResponse.
            message = Encoded(b"".join(self._chunks), self._rows)
            self._chunks, self._size, self._rows = [], 0, 0
            # A reader that takes nothing within the stall timeout ends the
            # stream READER_STALLED, naming this message's last id.
            await write_within(self._context, message, self._stall_timeout, position=self._last)


async def stream_events(
    db: Database,
    request: event_service_pb2.StreamEventsRequest,
    context: grpc.aio.ServicerContext,
    *,
    streams: StreamSlots,
    followers: StreamSlots,
    feed: EventFeed,
    batch_bytes: int,
    write_stall_timeout: float,
) -> None:
    _checked(request)
    filter_args: list[object] = []
    if request.types:
        filter_args.append(list(request.types))
    if request.subject:
        filter_args.append(request.subject)
    with_types, with_subject = bool(request.types), bool(request.subject)
    batches = _Batches(context, batch_bytes, write_stall_timeout)

    with streams.hold():
        position = await _stream_history(
            db,
            context,
            request.after_id,
            sql.events_in_range(with_types=with_types, with_subject=with_subject, limited=False),
            filter_args,
            batches,
        )
    if not request.follow:
        return
    with followers.hold():
        await _follow(
            db,
            context,
            position,
            sql.events_in_range(with_types=with_types, with_subject=with_subject, limited=True),
            filter_args,
            batches,
            feed,
        )


async def _stream_history(
    db: Database,
    context: grpc.aio.ServicerContext,
    after_id: int,
    query: str,
    filter_args: list[object],
    batches: _Batches,
) -> int:
    """Streams (after_id, horizon); returns the position the stream reached."""
    conn = await db.acquire(context)
    try:
        horizon = await conn.fetchval(sql.SAFE_HORIZON, timeout=db.query_timeout(context))
        if horizon - 1 > after_id:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                cursor = await db.cursor(conn, context, query, after_id, horizon, *filter_args)
                await _drain(cursor, batches, lambda: db.query_timeout(context))
        await batches.flush()
    finally:
        await db.release(conn)
    return max(after_id, horizon - 1)


async def _drain(
    cursor: asyncpg.cursor.Cursor, batches: _Batches, timeout: Callable[[], float]
) -> None:
    """Feeds every row of `cursor` to `batches`, one round trip ahead: the
    next fetch is in flight while this batch is turned into messages, so
    PostgreSQL produces rows on one core while Python builds on the other."""
    pending = asyncio.ensure_future(cursor.fetch(FETCH_ROWS, timeout=timeout()))
    try:
        while rows := await pending:
            pending = asyncio.ensure_future(cursor.fetch(FETCH_ROWS, timeout=timeout()))
            await batches.add(rows)
    finally:
        if not pending.done():
            # Never leave a fetch running on a connection going back to the pool.
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pending


async def _follow(
    db: Database,
    context: grpc.aio.ServicerContext,
    position: int,
    query: str,
    filter_args: list[object],
    batches: _Batches,
    feed: EventFeed,
) -> None:
    """Streams new events as they become final, until cancel, deadline or
    shutdown (which ends the stream UNAVAILABLE: resume elsewhere)."""
    while True:
        seen = feed.generation
        if feed.closing:
            raise ServiceError(
                grpc.StatusCode.UNAVAILABLE,
                Reason.SHUTTING_DOWN,
                "the server is shutting down; resume after the last id received",
                retry_after=0.0,
                metadata={"position": str(position)},
            )
        row = await db.fetchrow(context, sql.SAFE_HORIZON)
        horizon: int = row[0]  # type: ignore[index]
        while position < horizon - 1:
            rows = await db.fetch(
                context, query, position, horizon, *filter_args, FOLLOW_CHUNK_ROWS
            )
            await batches.add(rows)
            position = rows[-1][0] if len(rows) == FOLLOW_CHUNK_ROWS else horizon - 1
        await batches.flush()
        await feed.wait(seen)
