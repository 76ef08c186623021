"""The feed's own connection and the shared tail it fills
(service/events/feed.py, service/events/tail.py), against the session's
database: each newly final range is read once for every follower, in id
order and without gaps (a commit that lands late is waited for); a lost
connection loses nothing; the tail's memory is bounded in bytes, and holds
nothing while nobody follows; followers asking the same share one message.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest

from orderstream.events.v1 import event_pb2, event_service_pb2
from service.db.pool import connect_direct
from service.events.feed import EventFeed
from service.events.tail import Filter, Tail
from service.settings import Settings
from service.streams.limits import StreamSlots
from tests.support.calls import publish
from tests.support.feeds import holds, running_feed
from tests.support.polling import eventually
from tests.support.requests import unique


class Connections:
    """The feed's connections, and a switch that refuses new ones."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.opened: list[asyncpg.Connection] = []
        self.refuse = False

    async def connect(self) -> asyncpg.Connection:
        if self.refuse:
            raise OSError("refused by the test")
        conn = await connect_direct(self.settings)
        self.opened.append(conn)
        return conn


@pytest.fixture
async def connections(service_env, app) -> Connections:
    return Connections(Settings.from_env(service_env))


@pytest.fixture
async def tail() -> Tail:
    return Tail(8 << 20)


@pytest.fixture
async def feed(connections: Connections, tail: Tail) -> AsyncIterator[EventFeed]:
    async with running_feed(connections.connect, tail, poll_interval=0.05) as feed:
        yield feed


def held(tail: Tail, subject: str) -> list[int]:
    """The ids the tail holds for `subject`, in order, and checks that the
    message built from the floor carries exactly those."""
    ids: list[int] = []
    position = tail.floor
    while position < tail.horizon - 1:
        message, position = tail.next_message(position, Filter(subject=subject), 1 << 20)
        if message is not None:
            parsed = event_service_pb2.StreamEventsResponse.FromString(message.data)
            ids.extend(event.id for event in parsed.events)
            assert len(parsed.events) == message.rows
    return ids


async def test_a_range_is_read_once_for_every_follower_in_order(feed, tail, events):
    subject = unique("tail/")
    with tail.following():
        floor = tail.horizon - 1
        published = await publish(events, subject, 5)
        published += await publish(events, subject, 3)
        await eventually(lambda: holds(tail.horizon > published[-1]), what="the tail to read")
        assert tail.floor <= floor
        assert held(tail, subject) == published


async def test_a_late_commit_holds_the_tail_back_until_it_lands(feed, tail, events, admin_db):
    subject = unique("late/")
    with tail.following():
        async with admin_db.acquire() as writer, writer.transaction():
            late = await writer.fetchval(
                "INSERT INTO events (type, source, subject, time, payload) "
                "VALUES ('test.late', '/tests', $1, now(), '{}') RETURNING id",
                subject,
            )
            after = await publish(events, subject, 2)  # committed, above `late`
            assert tail.horizon <= late  # the open writer holds it back
        await eventually(lambda: holds(tail.horizon > after[-1]), what="the late commit")
        assert held(tail, subject) == [late, *after]


async def test_a_lost_connection_loses_nothing(feed, tail, events, connections, admin_db):
    subject = unique("lost/")
    with tail.following():
        before = await publish(events, subject, 2)
        await eventually(lambda: holds(tail.horizon > before[-1]), what="the tail to read")
        connections.refuse = True
        seen = tail.generation
        await admin_db.execute(
            "SELECT pg_terminate_backend($1)", connections.opened[-1].get_server_pid()
        )
        await asyncio.wait_for(tail.wait(seen), 10)
        await eventually(lambda: holds(not tail.live), what="the tail to notice")
        during = await publish(events, subject, 2)
        assert tail.horizon <= during[0]
        connections.refuse = False
        await eventually(lambda: holds(tail.horizon > during[-1]), what="the tail to go on")
        assert held(tail, subject) == before + during


async def test_the_tail_is_bounded_in_bytes_and_empty_without_followers(connections, events):
    tail = Tail(4 << 20)
    feed = EventFeed(connections.connect, tail, poll_interval=0.05)
    await feed.start()
    try:
        await eventually(lambda: holds(tail.live and tail.ready), what="the feed to connect")
        subject = unique("bounded/")
        with tail.following():
            ids: list[int] = []
            for _ in range(12):  # ~6 MiB of events
                ids += await publish_large(events, subject, 10, 50_000)
            await eventually(lambda: holds(tail.horizon > ids[-1]), what="the tail to read")
            assert tail.size <= 4 << 20
            assert ids[0] <= tail.floor < ids[-1]  # the oldest were dropped
            assert held(tail, subject) == [i for i in ids if i > tail.floor]
        more = await publish(events, subject, 1)
        await eventually(lambda: holds(tail.horizon > more[-1]), what="the tail to move on")
        assert tail.size == 0 and tail.floor == tail.horizon - 1
    finally:
        await feed.close()


async def publish_large(events, subject: str, count: int, size: int) -> list[int]:
    request = event_service_pb2.PublishEventsRequest(
        events=[
            event_pb2.Event(
                type="test.large", source="/tests", subject=subject, json_payload=_pad(size)
            )
            for _ in range(count)
        ]
    )
    return list((await events.PublishEvents(request)).ids)


def _pad(size: int) -> str:
    return '{"pad": "' + "x" * size + '"}'


async def test_followers_asking_the_same_share_one_message(feed, tail, events):
    subject = unique("shared/")
    with tail.following():
        position = tail.horizon - 1
        ids = await publish(events, subject, 3)
        await eventually(lambda: holds(tail.horizon > ids[-1]), what="the tail to read")
        first = tail.next_message(position, Filter(subject=subject), 1 << 20)
        again = tail.next_message(position, Filter(subject=subject), 1 << 20)
        other = tail.next_message(position, Filter(subject=unique("none/")), 1 << 20)
        assert first[0] is again[0] and first[0] is not None
        assert other[0] is None and other[1] == first[1] == tail.horizon - 1


async def test_queued_slots_serve_in_turn_and_held_slots_never_jump_the_queue():
    slots = StreamSlots(1, "stream")
    order: list[int] = []
    release = asyncio.Event()

    async def take(n: int) -> None:
        async with slots.queued():
            order.append(n)
            await release.wait()

    first = asyncio.create_task(take(1))
    await asyncio.sleep(0)
    waiting = [asyncio.create_task(take(n)) for n in (2, 3)]
    await asyncio.sleep(0)
    cancelled = asyncio.create_task(take(4))
    await asyncio.sleep(0)
    cancelled.cancel()
    with pytest.raises(Exception, match="slots of this server are busy"), slots.hold():
        pass
    release.set()
    await asyncio.gather(first, *waiting)
    assert order == [1, 2, 3]
    assert slots.in_use == 0
