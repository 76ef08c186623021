"""StreamEvents: the event feed in id order, never past a gap-free horizon.

History is read from the table up to the safe horizon computed just before
it (see migrations/0002_streaming.sql and 0004), so every id below it is
final and a consumer resuming from the last id it saw misses nothing. It
reads in pages bounded in bytes (sql.events_page), each on a briefly
borrowed pooled connection, one page ahead of what is being written: a
stream holds no connection, and no transaction, while its caller reads.

With `follow`, the stream then hands over without gap or duplicate to the
process's shared tail (service/events/tail.py), which the feed's own
connection fills once for every follower: a follower near the live end
reads only memory. One that is further back than the tail holds reads the
table up to it first, taking one of the stream slots for as long as that
takes; when none is free it waits its turn instead of being refused, so
followers that arrive together (after a rolling restart) are all served.
The position moves past events the filter does not match too, so a
follower never looks at the same range twice.

A stream naming a durable consumer (service/events/consumers.py) starts,
without `after_id`, right after the consumer's acknowledged position, and
records each message's position as delivered before writing it. With
`progress`, a stream whose filter has matched nothing for the heartbeat
interval while its position moved says where it is (a consumer may
acknowledge that far), and a follow stream says once when its history has
caught up with the live end (docs/streams.md#progress).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import asyncpg
import grpc

from orderstream.events.v1 import event_service_pb2
from service.db.failures import NoConnection
from service.db.runner import Database
from service.errors import Reason, ServiceError
from service.events import consumers, groups, retention, sql
from service.events.feed import EventFeed
from service.events.progress import Progress
from service.events.tail import Filter
from service.events.wire import encode_events
from service.rpc.encoded import Encoded
from service.rpc.validation import Violations
from service.streams.limits import StreamSlots
from service.streams.packing import Messages
from service.streams.writes import StallBound, stall_bound

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
    if request.consumer:
        consumers.check_name(v, "consumer", request.consumer)
    if request.member:
        consumers.check_name(v, "member", request.member)
        if not request.consumer:
            v.add("member", "a member belongs to a consumer: set `consumer` too")
        if request.after_id:
            v.add(
                "after_id", "must be 0 for a group member: it starts at its partitions' positions"
            )
    v.raise_if_any()


# Pages still being read when their stream ended (the caller cancelled, a
# write failed): each is one statement bounded in rows, bytes and time,
# left to finish and give its connection back by itself. Cancelling it
# would make asyncpg open a new TLS connection to send PostgreSQL a
# CancelRequest, which costs both processes more than the rest of the page,
# at the moment a reader that took its first events and left, a common way
# to read, moves on to its next call.
_UNFINISHED: set[asyncio.Future[Any]] = set()


def _let_finish(page: asyncio.Future[Any]) -> None:
    _UNFINISHED.add(page)  # asyncio keeps only weak references to tasks
    page.add_done_callback(_finished)


def _finished(page: asyncio.Future[Any]) -> None:
    _UNFINISHED.discard(page)
    if not page.cancelled():
        page.exception()  # nobody reads the page: its failure is no one's error


class _Stream:
    """One StreamEvents call: its filter, its position, and how it reads."""

    def __init__(
        self,
        db: Database,
        request: event_service_pb2.StreamEventsRequest,
        context: grpc.aio.ServicerContext,
        batch_bytes: int,
        writes: StallBound,
        heartbeat_interval: float,
        member_timeout: float,
    ) -> None:
        self._db = db
        self._context = context
        self._writes = writes
        self._consumer = request.consumer
        self.membership = (
            groups.Membership(db, context, request.consumer, request.member)
            if request.member
            else None
        )
        self._member_timeout = member_timeout
        self._refresh_at = self._kept_at = 0.0
        self._loop = asyncio.get_running_loop()
        self.filter = Filter(frozenset(request.types), request.subject)
        types, self._filter_args = sql.type_filter(request.types)
        self._query = sql.events_page(
            types=types,
            with_subject=bool(request.subject),
            # A member reads only its partitions' rows from the table.
            partitions=groups.PARTITIONS if request.member else 0,
        )
        if request.subject:
            self._filter_args.append(request.subject)
        # A member's partitions, the last argument: set on each reassignment.
        self._partitions: list[list[int]] = [[]] if request.member else []
        # Rows become wire bytes in C (service/events/wire.c): the per-row
        # cost is what bounds a stream's rate.
        self.batches = Messages(encode_events, self.write, batch_bytes)
        self.budget = batch_bytes
        self.position = request.after_id
        self.progress = Progress(
            asked=request.progress, interval=heartbeat_interval, position=self.position
        )

    async def start(self) -> None:
        """Resumes a consumer's stream without `after_id` after its
        acknowledged position; a stream from the start (position 0) starts
        at the feed's lower end, after what retention deleted."""
        if self._consumer:
            position = await consumers.open_consumer(self._db, self._context, self._consumer)
            if self.membership is not None:
                await self.membership.join()
                # Every member looks at the group within a third of the
                # timeout: waiting that long, a new member finds the
                # partitions it takes already given up by their old members
                # (few events read twice), and members started together
                # find each other at once.
                await asyncio.sleep(self._member_timeout / 3)
                await self.refresh_group()
            elif not self.position:
                self.position = position
        if not self.position:
            self.position = await self._value(retention.TRUNCATED_UPTO)
        self.progress.restart(self.position)

    def refresh_due_in(self) -> float | None:
        """Seconds until a group member looks at its group again."""
        if self.membership is None:
            return None
        return max(0.0, self._refresh_at - self._loop.time())

    async def refresh_group(self) -> None:
        """Refreshes the member's row and, when its partitions changed,
        restarts at their lowest acknowledged position (groups.py)."""
        assert self.membership is not None
        # Due again a third of the timeout on, even if this look fails.
        self._refresh_at = self._kept_at = self._loop.time() + self._member_timeout / 3
        members = await self.membership.live_members(self._member_timeout)
        partitions = groups.assigned(members, self.membership.member)
        if partitions == self.membership.partitions:
            return
        await self.batches.flush()  # nothing of the old share is left pending
        group = await self.membership.reassign(partitions, restart_default=self.position)
        self._partitions[0] = partitions
        self.filter = dataclasses.replace(self.filter, group=group)
        self.position = group.lowest(default=self.position)
        self.progress.restart(self.position)
        await self._tell(self.progress.partitions(self.position, partitions, len(members)))

    async def _keep_membership(self) -> None:
        """A member reading a long history stays in its group: its row is
        refreshed between pages (its partitions change only between reads,
        at the follow loop's next look)."""
        if self.membership is not None and self._loop.time() >= self._kept_at:
            await self.membership.live_members(self._member_timeout)
            self._kept_at = self._loop.time() + self._member_timeout / 3

    def wait_timeout(self, longest: float | None) -> float | None:
        """How long a follower may wait for the tail before a heartbeat or
        a look at its group is due."""
        due = (longest, self.progress.due_in(self.position), self.refresh_due_in())
        return min((t for t in due if t is not None), default=None)

    async def _value(self, query: str, *args: object) -> Any:
        row = await self._db.fetchrow(self._context, query, *args)
        assert row is not None
        return row[0]

    async def write(self, message: Encoded, position: int) -> None:
        """Writes `message`, whose last event is at `position`; a reader
        that takes nothing within the stall timeout ends the stream
        (READER_STALLED, docs/streams.md#quiet-callers). A consumer's
        delivered position is stored first: the caller may acknowledge it
        on any replica as soon as it has the message. The position follows
        every write, so a follower whose table read failed halfway goes on
        after the last event it sent."""
        if self.membership is not None:
            await self.membership.mark_delivered(position)
        elif self._consumer:
            await consumers.mark_delivered(self._db, self._context, self._consumer, position)
        await self._writes.write(message, position=position)
        self.position = max(self.position, position)
        self.progress.told(position)

    async def _tell(self, message: Encoded | None) -> None:
        """Writes a progress message, if there is one (at the position)."""
        if message is not None:
            await self.write(message, self.position)

    async def heartbeat(self, *, now: bool = False) -> None:
        """Tells the caller the stream's position if it moved past the last
        one told and the filter has matched nothing for the heartbeat
        interval (or `now`: a history stream's end)."""
        await self._tell(self.progress.heartbeat(self.position, now=now))

    async def at_live_end(self) -> None:
        """The position reached the live end: said once, with progress."""
        await self._tell(self.progress.live_end(self.position))

    async def horizon(self) -> int:
        """The safe horizon now: every event with a lower id is final."""
        row = await self._db.fetchrow(self._context, sql.SAFE_HORIZON)
        assert row is not None
        return int(row[0])

    async def read_table(self, below: int) -> None:
        """Streams the matching events with position < id < `below` from
        the table, one page ahead of the writes; the position reaches
        below - 1.

        The first page is small and goes out at once, whatever the batch
        budget: a reader starting far back in a large feed gets its first
        events after a few hundred rows are read, not after a full page of
        events scattered over the table (the pages after it grow back to
        PAGE_ROWS: sql.next_limit)."""
        limit = sql.FIRST_PAGE_ROWS
        after = self.position
        pending = self._page(after, below, limit)
        first = True
        try:
            while True:
                # Shielded: the caller's cancel ends the stream, not the
                # page (see _let_finish).
                rows = await asyncio.shield(pending)
                # Retention may have deleted from under the page.
                await retention.check_retained(self._value, after)
                if not sql.page_is_cut(rows, limit):
                    await self.batches.add(self._share(rows))
                    break
                if first:  # out before the next page is asked for
                    await self.batches.add(self._share(rows))
                    await self.batches.flush()
                limit = sql.next_limit(rows, limit)
                after = rows[-1][0]
                pending = self._page(after, below, limit)
                if not first:  # the next page is read while this one is written
                    await self.batches.add(self._share(rows))
                first = False
                await self._keep_membership()
            await self.batches.flush()
        except BaseException:
            # What was packed and not sent comes again with the retry
            # (the position follows writes only), so it must not stay.
            self.batches.discard()
            raise
        finally:
            if not pending.done():
                _let_finish(pending)
        self.position = max(self.position, below - 1)

    def _share(self, rows: list[Any]) -> list[Any]:
        """A group member's share of a page: the statement left out other
        partitions; this leaves out each partition's events up to its
        acknowledged position."""
        group = self.filter.group
        if group is None:
            return rows
        return [row for row in rows if group.accepts(row[0], row[3])]

    def _page(self, after: int, below: int, limit: int) -> asyncio.Future[list[Any]]:
        return asyncio.ensure_future(
            self._db.fetch(
                self._context,
                self._query,
                after,
                below,
                *self._filter_args,
                *self._partitions,
                limit,
                sql.PAGE_BYTES,
            )
        )


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
    heartbeat_interval: float,
    member_timeout: float,
) -> None:
    _checked(request)
    with stall_bound(context, write_stall_timeout) as writes:
        stream = _Stream(
            db, request, context, batch_bytes, writes, heartbeat_interval, member_timeout
        )
        # The slot first: a stream over the limit is refused before any
        # database work.
        try:
            if not request.follow:
                with streams.hold():
                    await stream.start()
                    await stream.read_table(await stream.horizon())
                    await stream.heartbeat(now=True)
                return
            with followers.hold():
                await stream.start()
                await _follow(stream, feed, streams)
        finally:
            if stream.membership is not None:
                # Its partitions move at once rather than after the member
                # timeout; if this fails, the timeout moves them.
                with contextlib.suppress(Exception):
                    await asyncio.shield(stream.membership.leave())


async def _follow(stream: _Stream, feed: EventFeed, streams: StreamSlots) -> None:
    """Streams new events as they become final, until cancel, deadline or
    shutdown (which ends the stream UNAVAILABLE: resume elsewhere)."""
    tail = feed.tail
    with tail.following():
        await _follow_tail(stream, feed, streams)


async def _follow_tail(stream: _Stream, feed: EventFeed, streams: StreamSlots) -> None:
    tail = feed.tail
    while True:
        seen = tail.generation
        if stream.refresh_due_in() == 0.0:
            with _while_the_database_is_down():
                await stream.refresh_group()
        if feed.closing:
            raise ServiceError(
                grpc.StatusCode.UNAVAILABLE,
                Reason.SHUTTING_DOWN,
                "the server is shutting down; resume after the last id received",
                retry_after=0.0,
                metadata={"position": str(stream.position)},
            )
        if not (tail.live and tail.ready):
            # The feed's connection is down: look at the table every poll
            # interval, as the feed would.
            with _while_the_database_is_down():
                horizon = await stream.horizon()
                if stream.position < horizon - 1:
                    async with streams.queued():
                        await stream.read_table(horizon)
            await stream.at_live_end()
            await stream.heartbeat()
            await tail.wait(seen, stream.wait_timeout(feed.poll_interval))
        elif stream.position < tail.floor:
            # Further back than the tail holds: the table up to it first.
            with _while_the_database_is_down():
                async with streams.queued():
                    await stream.read_table(tail.floor + 1)
                continue
            await tail.wait(seen, stream.wait_timeout(feed.poll_interval))
        elif stream.position < tail.truncated_upto:
            # The feed found events it had not read deleted by retention.
            raise retention.expired(stream.position, tail.truncated_upto, None)
        elif stream.position < tail.horizon - 1:
            message, stream.position = tail.next_message(
                stream.position, stream.filter, stream.budget
            )
            if message is not None:
                await stream.write(message, stream.position)
            else:
                await stream.heartbeat()
        else:
            await stream.at_live_end()
            await stream.heartbeat()
            await tail.wait(seen, stream.wait_timeout(None))


# The database gone or going (a restart, a failover, a network cut): the
# connection lost, none to be had, or the server refusing to serve.
_DATABASE_DOWN = (
    OSError,  # TimeoutError among them: a statement the server did not answer in time
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,  # TargetServerAttributeNotMatched among them
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    NoConnection,
)


@contextlib.contextmanager
def _while_the_database_is_down() -> Iterator[None]:
    """A follower waits for the database as it waits for events: it tries
    again at the next round (the caller's deadline still ends it), and
    goes on after the last event it sent, with no gap and no duplicate.
    Ending it would send every follower's client to reconnect at once,
    for nothing the stream itself did wrong."""
    with contextlib.suppress(*_DATABASE_DOWN):
        yield
