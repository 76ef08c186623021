"""The feed's pacing (service/events/pacing.py): rounds at the base interval
while the event loop has time to spare; further apart, in proportion to the
fan-out's length, while other work keeps it busy; back at once when it has
time again. A paced round does not delay the process's announcements to
the other replicas.

The pacer's rule is checked against a clock and a CPU clock the test sets;
the feed's behaviour against the session's database, with followers that
read the shared tail and a task that keeps the event loop busy."""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections.abc import AsyncIterator

import pytest

from service.db.pool import connect_direct
from service.events.feed import EventFeed
from service.events.pacing import BUSY, JUDGED_WINDOW, SHARE, RoundPacer
from service.events.tail import Filter, Tail
from service.settings import Settings
from tests.support.calls import publish
from tests.support.feeds import holds, running_feed
from tests.support.polling import eventually
from tests.support.requests import unique

BASE = 0.03  # not a divisor of JUDGED_WINDOW: no float ties
LONGEST = 0.5


class Clocks:
    """Wall and thread CPU time, moved by the test."""

    def __init__(self) -> None:
        self.now = 100.0
        self.cpu = 10.0

    def pass_time(self, seconds: float, busy: float) -> None:
        """`seconds` go by, the loop's thread busy for `busy` of them."""
        self.now += seconds
        self.cpu += seconds * busy


class Rounds:
    """A pacer and the rounds it paces: each round wakes the followers,
    whose fan-out takes `fan_out` seconds, then the loop does other work
    until the next round."""

    def __init__(self) -> None:
        self.clocks = Clocks()
        self.pacer = RoundPacer(
            LONGEST, clock=lambda: self.clocks.now, thread_cpu=lambda: self.clocks.cpu
        )
        self.settled_at = 0.0
        self.interval = self.pacer.round_made(self.settled_at, BASE)

    def next(self, fan_out: float, other_work: float) -> float:
        """Runs the fan-out and the interval after it; the next round's
        interval."""
        self.clocks.pass_time(fan_out, busy=1.0)
        self.settled_at = self.clocks.now
        self.clocks.pass_time(self.interval, busy=other_work)
        self.interval = self.pacer.round_made(self.settled_at, BASE)
        return self.interval


def judged(rounds: Rounds, fan_out: float, other_work: float) -> float:
    """Runs rounds until the loop's business has been judged again; the
    interval that follows."""
    window = 0.0
    while window < JUDGED_WINDOW:
        window += rounds.interval
        interval = rounds.next(fan_out, other_work)
    return interval


def test_rounds_keep_the_base_interval_while_the_loop_has_time_to_spare():
    rounds = Rounds()
    assert rounds.interval == BASE
    for _ in range(3):
        assert judged(rounds, fan_out=0.03, other_work=BUSY / 2) == BASE


def test_a_busy_loop_spaces_rounds_out_to_keep_the_fan_out_to_its_share():
    rounds = Rounds()
    assert judged(rounds, fan_out=0.03, other_work=0.95) == pytest.approx(0.03 / SHARE)
    # The estimate of the fan-out's length follows it, smoothed.
    assert BASE < rounds.next(fan_out=0.01, other_work=0.95) < 0.03 / SHARE


def test_business_is_judged_over_a_window_not_one_gap():
    rounds = Rounds()
    gaps = math.ceil(JUDGED_WINDOW / BASE)
    # One busy gap among quiet ones (a young collection, say) stretches
    # nothing: the loop was busy for less than half of the window.
    assert rounds.next(fan_out=0.03, other_work=1.0) == BASE
    for _ in range(gaps - 1):
        assert rounds.next(fan_out=0.03, other_work=0.1) == BASE
    # Busy gaps stretch the rounds once they fill a window.
    for _ in range(gaps - 1):
        assert rounds.next(fan_out=0.03, other_work=1.0) == BASE
    assert rounds.next(fan_out=0.03, other_work=1.0) > BASE


def test_a_short_fan_out_keeps_short_rounds_however_busy_the_loop():
    rounds = Rounds()
    for _ in range(3):
        assert judged(rounds, fan_out=0.001, other_work=1.0) == BASE


def test_the_interval_is_bounded_by_the_busy_interval():
    rounds = Rounds()
    assert judged(rounds, fan_out=0.2, other_work=1.0) == LONGEST


def test_rounds_come_back_to_the_base_interval_once_the_loop_has_time():
    rounds = Rounds()
    assert judged(rounds, fan_out=0.03, other_work=1.0) > BASE
    # The stretched interval is a window by itself: judged at once.
    assert rounds.next(fan_out=0.03, other_work=0.1) == BASE


def test_a_fan_out_still_running_at_the_next_round_keeps_the_interval():
    rounds = Rounds()
    stretched = judged(rounds, fan_out=0.03, other_work=1.0)
    # No follower settled since the last round: nothing to measure.
    rounds.clocks.pass_time(stretched, busy=1.0)
    assert rounds.pacer.round_made(rounds.settled_at, BASE) == stretched


# -- the feed ----------------------------------------------------------------

FOLLOWERS = 50
WRITE_CPU = 0.0004  # seconds of CPU a follower's write takes here


@pytest.fixture
async def paced_feed(service_env, app) -> AsyncIterator[EventFeed]:
    connect = functools.partial(connect_direct, Settings.from_env(service_env))
    async with running_feed(connect, Tail(8 << 20), pacer=RoundPacer(LONGEST)) as feed:
        yield feed


def spin(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


class Follower:
    """Reads every message the tail has for `subject`, as a follow stream
    does, each write costing the loop WRITE_CPU."""

    def __init__(self, tail: Tail, subject: str) -> None:
        self.tail = tail
        self.filter = Filter(subject=subject)
        self.position = tail.horizon - 1
        self.messages: list[int] = []  # events per message

    async def run(self) -> None:
        tail = self.tail
        with tail.following():
            while True:
                seen = tail.generation
                if self.position < tail.horizon - 1:
                    message, self.position = tail.next_message(self.position, self.filter, 1 << 20)
                    if message is not None:
                        self.messages.append(message.rows)
                        spin(WRITE_CPU)
                        await asyncio.sleep(0)
                    continue
                await tail.wait(seen)


async def keep_the_loop_busy(stop: asyncio.Event) -> None:
    while not stop.is_set():
        spin(0.005)
        await asyncio.sleep(0)


async def publish_steadily(events, subject: str, count: int) -> list[int]:
    """One event every 10 ms (or every turn of a busier loop), each its own
    call, without waiting for the calls before it."""
    calls = []
    for _ in range(count):
        calls.append(asyncio.ensure_future(publish(events, subject, 1)))
        await asyncio.sleep(0.01)
    return sorted(id_ for ids in await asyncio.gather(*calls) for id_ in ids)


async def test_a_busy_loop_gets_fewer_larger_messages_and_every_event(paced_feed, events):
    subject = unique("paced/")
    followers = [Follower(paced_feed.tail, subject) for _ in range(FOLLOWERS)]
    reading = [asyncio.create_task(f.run()) for f in followers]
    stop = asyncio.Event()
    busy = asyncio.create_task(keep_the_loop_busy(stop))
    try:
        busy_ids = await publish_steadily(events, subject, 40)
        await eventually(
            lambda: holds(all(f.position >= busy_ids[-1] for f in followers)),
            what="every follower to read every event",
        )
        stop.set()
        await busy
        busy_messages = len(followers[0].messages)
        quiet_ids = await publish_steadily(events, subject, 40)
        await eventually(
            lambda: holds(all(f.position >= quiet_ids[-1] for f in followers)),
            what="every follower to read every event",
        )
    finally:
        stop.set()
        for task in (busy, *reading):
            task.cancel()
        await asyncio.gather(busy, *reading, return_exceptions=True)
    quiet_messages = len(followers[0].messages) - busy_messages
    for follower in followers:
        assert sum(follower.messages) == len(busy_ids) + len(quiet_ids)
    # Rounds at the base interval would make a message of one or two events.
    assert busy_messages <= len(busy_ids) / 5
    assert quiet_messages > busy_messages


PAUSE = 3.0  # seconds between the rounds of a process kept busy, here


class Unhurried(RoundPacer):
    """Paces every round PAUSE apart, as a busy process's pacer would."""

    def round_made(self, settled_at: float, base: float) -> float:
        return PAUSE


async def insert_event(admin_db, subject: str) -> int:
    """An event committed by another writer: only an announcement (or a
    look at the table) tells a feed of it."""
    return await admin_db.fetchval(
        "INSERT INTO events (type, source, subject, time, payload) "
        "VALUES ('test.paced', '/tests', $1, now(), '{}') RETURNING id",
        subject,
    )


async def test_a_paced_process_still_announces_its_commits_at_once(service_env, app, admin_db):
    connect = functools.partial(connect_direct, Settings.from_env(service_env))
    subject = unique("announced/")
    paced_tail, other_tail = Tail(8 << 20), Tail(8 << 20)
    async with (
        running_feed(connect, paced_tail, pacer=Unhurried(LONGEST)) as paced,
        running_feed(connect, other_tail, poll_interval=30.0),  # another replica's
    ):
        with paced_tail.following():  # rounds with a follower are paced
            first = await insert_event(admin_db, subject)
            paced.announce()
            await eventually(lambda: holds(paced_tail.horizon > first), what="the paced round")
            # The paced feed now waits PAUSE before its next round; what this
            # process commits meanwhile is announced to the others all the same.
            second = await insert_event(admin_db, subject)
            paced.announce()
            await eventually(
                lambda: holds(other_tail.horizon > second),
                timeout=PAUSE / 2,
                what="the announcement",
            )
            assert paced_tail.horizon <= second  # its own next round is still to come
