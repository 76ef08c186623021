"""The change feed under real fan-out (issue 15), black-box: each test starts
its own `python -m service serve` with settings from the environment, and
only uses the gRPC contract and what the process and the database show
(/proc, pg_stat_activity under the process's own login role, its access
log). Behaviour is asserted, never timings:

- followers within ORDERSTREAM_MAX_FOLLOWERS are never refused;
- followers do not starve unary calls of pooled connections, and once
  caught up hold at most 2 database connections between them;
- streaming 1 MB events stays within a memory bound derived from
  ORDERSTREAM_STREAM_BATCH_BYTES;
- a follower that does not read is ended UNAVAILABLE / READER_STALLED with
  its `position` within ORDERSTREAM_WRITE_STALL_TIMEOUT, and the memory it
  pinned is given back.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import grpc
import pytest

from devcluster.process import ServiceProcess, service_process
from orderstream.events.v1 import event_pb2, event_service_pb2, event_service_pb2_grpc
from orderstream.orders.v1 import order_service_pb2, order_service_pb2_grpc
from tests.support.polling import eventually
from tests.support.processes import Login, serve_env
from tests.support.requests import create_request
from tests.support.status import StatusDetails, details

pytestmark = pytest.mark.slow

MiB = 1 << 20
STREAM_EVENTS = event_service_pb2_grpc.EventServiceStub  # shorthand for the stubs' type


def fanout_env(service_env: dict[str, str], login: Login, **settings: str) -> dict[str, str]:
    env = serve_env(service_env, login, grace=5, event_loop=None)
    env.update({"ORDERSTREAM_MAX_FOLLOWERS": "2000", **settings})
    return env


@contextlib.asynccontextmanager
async def serving(env: dict[str, str]) -> AsyncIterator[ServiceProcess]:
    async with service_process(env, "serve") as child:
        await child.wait_serving(30)
        yield child


@contextlib.asynccontextmanager
async def stubs(
    port: int, count: int, options: list[tuple[str, int]] | None = None
) -> AsyncIterator[list[STREAM_EVENTS]]:
    """`count` channels, each its own HTTP/2 connection."""
    channels = [
        grpc.aio.insecure_channel(
            f"127.0.0.1:{port}", options=[("test.channel", n), *(options or [])]
        )
        for n in range(count)
    ]
    try:
        yield [event_service_pb2_grpc.EventServiceStub(c) for c in channels]
    finally:
        for channel in channels:
            await channel.close()


def small_event(n: int = 0) -> event_pb2.Event:
    return event_pb2.Event(
        type="test.fanout", source="/tests", subject=f"fanout/{n}", json_payload=f'{{"n": {n}}}'
    )


async def publish(stub: STREAM_EVENTS, *events: event_pb2.Event) -> list[int]:
    response = await stub.PublishEvents(
        event_service_pb2.PublishEventsRequest(events=events), timeout=30
    )
    return list(response.ids)


def follow(stub: STREAM_EVENTS, after: int) -> grpc.aio.UnaryStreamCall:
    return stub.StreamEvents(event_service_pb2.StreamEventsRequest(after_id=after, follow=True))


def summary(failures: list[StatusDetails]) -> collections.Counter[tuple[str, str | None]]:
    return collections.Counter(
        (f.code.name, f.error_info.reason if f.error_info else None) for f in failures
    )


def reset_peak_rss(pid: int) -> None:
    """Resets VmHWM to the current VmRSS (proc(5): clear_refs, value 5)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


async def backends(admin: asyncpg.Pool, role: str) -> list[asyncpg.Record]:
    return await admin.fetch(
        """
        SELECT state, query FROM pg_stat_activity
        WHERE usename = $1 AND application_name = 'orderstream'
        """,
        role,
    )


def followers_connections(rows: list[asyncpg.Record]) -> int:
    """Backends at work on the event feed for followers: not idle, on the
    events table, and not a publisher's events_publish."""
    return sum(
        1
        for row in rows
        if row["state"] != "idle"
        and "events" in (row["query"] or "")
        and "events_publish" not in (row["query"] or "")
    )


class Sampler:
    """pg_stat_activity of the process's role, every 50 ms, in the background."""

    def __init__(self, admin: asyncpg.Pool, role: str) -> None:
        self.admin, self.role = admin, role
        self.samples: list[list[asyncpg.Record]] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            self.samples.append(await backends(self.admin, self.role))
            await asyncio.sleep(0.05)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[list[list[asyncpg.Record]]]:
        start = len(self.samples)
        self._task = asyncio.create_task(self._run())
        try:
            yield self.samples
        finally:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            del self.samples[:start]


class Reader:
    """A follower that reads every event; retries a refusal from where it was
    (only where the test is about something else than refusals)."""

    def __init__(self, stub: STREAM_EVENTS, after: int, changed: asyncio.Condition) -> None:
        self.last = after
        self.refused = 0
        self.ended: StatusDetails | None = None
        self._stub, self._changed = stub, changed
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            call = follow(self._stub, self.last)
            try:
                async for response in call:
                    if response.events:
                        self.last = response.events[-1].id
                        async with self._changed:
                            self._changed.notify_all()
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    self.refused += 1
                    await asyncio.sleep(0.05)
                    continue
                self.ended = details(error)
                async with self._changed:
                    self._changed.notify_all()
            return


async def all_reached(readers: list[Reader], last: int, changed: asyncio.Condition) -> None:
    async with changed:
        await changed.wait_for(lambda: all(r.last >= last or r.ended for r in readers))
    ended = [r.ended for r in readers if r.ended]
    assert ended == [], summary([e for e in ended if e])


# -- a. 1,000 followers at once --------------------------------------------------


async def test_a_thousand_followers_connecting_at_once_are_all_served(service_env, login):
    async with (
        serving(fanout_env(service_env, login)) as child,
        stubs(child.port, 8) as events,
    ):
        (after,) = await publish(events[0], small_event())
        calls = [follow(events[n % len(events)], after) for n in range(1000)]

        async def first_id(call: grpc.aio.UnaryStreamCall) -> int | StatusDetails:
            try:
                async with asyncio.timeout(60):
                    response = await call.read()
            except grpc.aio.AioRpcError as error:
                return details(error)
            assert response is not grpc.aio.EOF, "a follower's stream ended"
            return response.events[0].id

        try:
            (published,) = await publish(events[0], small_event(1))
            outcomes = await asyncio.gather(*(first_id(call) for call in calls))
        finally:
            for call in calls:
                call.cancel()
        refused = [o for o in outcomes if isinstance(o, StatusDetails)]
        assert summary(refused) == {}, "followers within ORDERSTREAM_MAX_FOLLOWERS were refused"
        assert outcomes == [published] * len(calls)


# -- b. followers beside unary calls ----------------------------------------------

FOLLOWERS_B = 200
RATE_B = 20  # events/s
UNDER_LOAD_EVENTS = 120  # ~6 s at RATE_B with GetOrder calls beside
CAUGHT_UP_EVENTS = 60  # ~3 s more with followers alone


async def test_followers_leave_the_pool_to_unary_calls(service_env, login, admin):
    env = fanout_env(service_env, login)
    pool_max = int(env["ORDERSTREAM_POOL_MAX_SIZE"])
    sampler = Sampler(admin, login.role)
    async with (
        serving(env) as child,
        stubs(child.port, 4) as events,
        grpc.aio.insecure_channel(f"127.0.0.1:{child.port}") as channel,
    ):
        orders = order_service_pb2_grpc.OrderServiceStub(channel)
        order = await orders.CreateOrder(create_request(), timeout=10)
        (after,) = await publish(events[0], small_event())
        changed = asyncio.Condition()
        readers = [Reader(events[n % len(events)], after, changed) for n in range(FOLLOWERS_B)]
        published = [after]

        async def publisher(count: int) -> None:
            for n in range(count):
                published.extend(await publish(events[n % len(events)], small_event(n)))
                await asyncio.sleep(1 / RATE_B)  # pacing: the load is the point

        failures: list[StatusDetails] = []
        done = asyncio.Event()

        async def getter() -> int:
            calls = 0
            while not done.is_set():
                try:
                    await orders.GetOrder(order_service_pb2.GetOrderRequest(id=order.id), timeout=2)
                except grpc.aio.AioRpcError as error:
                    failures.append(details(error))
                calls += 1
            return calls

        try:
            async with sampler.running() as under_load:
                getters = [asyncio.create_task(getter()) for _ in range(8)]
                await publisher(UNDER_LOAD_EVENTS)
                done.set()
                calls = sum(await asyncio.gather(*getters))
                most = max(len(rows) for rows in under_load)
            assert calls > 0
            assert summary(failures) == {}, "GetOrder calls failed beside the followers"
            assert most <= pool_max + 2, f"{most} database connections"

            await all_reached(readers, published[-1], changed)
            async with sampler.running() as caught_up:
                await publisher(CAUGHT_UP_EVENTS)
                await all_reached(readers, published[-1], changed)
                held = max(followers_connections(rows) for rows in caught_up)
                most = max(len(rows) for rows in caught_up)
            assert held <= 2, f"caught-up followers held {held} connections at once"
            assert most <= pool_max + 2, f"{most} database connections"
        finally:
            for reader in readers:
                reader.task.cancel()
            await asyncio.gather(*(r.task for r in readers), return_exceptions=True)


# -- c. 1 MB events under the memory bound ----------------------------------------

BIG_EVENTS = 300
BIG_PAYLOAD = 1_000_000  # characters of filler; the written-out payload stays under 1 MiB
BATCH_BYTES = 1 * MiB


def big_event(n: int) -> event_pb2.Event:
    payload = json.dumps({"n": n, "filler": "x" * BIG_PAYLOAD})
    return event_pb2.Event(type="test.fanout.big", source="/tests", json_payload=payload)


async def test_large_events_stream_within_a_memory_bound(service_env, login):
    env = fanout_env(service_env, login, ORDERSTREAM_STREAM_BATCH_BYTES=str(BATCH_BYTES))
    max_message = int(env.get("ORDERSTREAM_MAX_MESSAGE_BYTES") or 4 * MiB)
    per_call = max(1, (max_message - 64 * 1024) // (BIG_PAYLOAD + 1024))
    async with serving(env) as child, stubs(child.port, 2) as events:
        (after,) = await publish(events[0], small_event())
        last = after
        for start in range(0, BIG_EVENTS, per_call):
            ids = await publish(
                events[0], *(big_event(n) for n in range(start, min(start + per_call, BIG_EVENTS)))
            )
            last = ids[-1]

        async def read_all(call: grpc.aio.UnaryStreamCall) -> int:
            count = 0
            async for response in call:
                count += len(response.events)
                if response.events and response.events[-1].id >= last:
                    break
            call.cancel()
            return count

        reset_peak_rss(child.pid)
        before_kib = child.rss_kib()
        history = events[0].StreamEvents(event_service_pb2.StreamEventsRequest(after_id=after))
        follower = follow(events[1], after)
        counts = await asyncio.gather(read_all(history), read_all(follower))
        growth = (child.peak_rss_kib() - before_kib) * 1024
    assert counts == [BIG_EVENTS, BIG_EVENTS]
    # Each of the two streams may hold, at once: the rows of one fetch and
    # of the next one prefetched (each bounded in bytes by the batch budget,
    # or one event if larger), the message being encoded and the message gRPC
    # is sending: 4 x ORDERSTREAM_STREAM_BATCH_BYTES per stream, 8 for both;
    # plus 64 MiB for the allocator, asyncpg's buffers and gRPC's own.
    bound = 8 * BATCH_BYTES + 64 * MiB
    assert growth <= bound, f"peak RSS grew {growth / MiB:.0f} MiB (bound {bound / MiB:.0f})"


# -- d. followers that never read ---------------------------------------------------

STALLED_FOLLOWERS = 200
STALL_EVENT_BYTES = 256 * 1024
STALL_EVENTS = 24  # ~6 MB, 3 to a PublishEvents call
RSS_RETURN_BOUND = 64 * MiB  # what the process may keep after the stalled streams end


def filler_event(n: int) -> event_pb2.Event:
    payload = json.dumps({"n": n, "filler": "y" * STALL_EVENT_BYTES})
    return event_pb2.Event(type="test.fanout.stall", source="/tests", json_payload=payload)


async def test_followers_that_never_read_are_ended_and_their_memory_returned(service_env, login):
    env = fanout_env(service_env, login, ORDERSTREAM_WRITE_STALL_TIMEOUT="1")
    # No BDP probing: the client's flow-control windows stay at their initial
    # 64 KiB, so a stream that is not read stops the server's writes quickly.
    options = [("grpc.http2.bdp_probe", 0)]
    async with serving(env) as child, stubs(child.port, 4, options) as events:
        (after,) = await publish(events[0], small_event())
        (marker,) = await publish(events[0], small_event(1))

        async def opened(n: int) -> grpc.aio.UnaryStreamCall:
            """A follower that has read the marker (retrying a refusal: test a
            is about those) and will never read again."""
            while True:
                call = follow(events[n % len(events)], after)
                try:
                    response = await call.read()
                except grpc.aio.AioRpcError as error:
                    if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                        raise
                    await asyncio.sleep(0.05)
                    continue
                assert response is not grpc.aio.EOF
                assert response.events[-1].id == marker
                return call

        calls = await asyncio.gather(*(opened(n) for n in range(STALLED_FOLLOWERS)))
        try:
            before_kib = child.rss_kib()
            last = marker
            for start in range(0, STALL_EVENTS, 3):
                last = (await publish(events[0], *map(filler_event, range(start, start + 3))))[-1]

            def stalled() -> int:
                return sum(
                    1
                    for entry in child.records
                    if entry.get("message") == "rpc"
                    and str(entry.get("method", "")).endswith("StreamEvents")
                    and entry.get("code") == "UNAVAILABLE"
                )

            async def all_ended() -> bool:
                return stalled() >= STALLED_FOLLOWERS

            # The service's access log shows when it has ended the streams;
            # reading before that would un-stall them.
            try:
                await eventually(all_ended, timeout=40, what="every stalled follower to be ended")
            except AssertionError as error:
                growth = (child.rss_kib() - before_kib) * 1024
                raise AssertionError(
                    f"{error}: {stalled()} of {STALLED_FOLLOWERS} ended, "
                    f"RSS {growth / MiB:.0f} MiB above its level before"
                ) from None
            endings: list[StatusDetails] = []
            for call in calls:
                try:
                    async with asyncio.timeout(30):
                        while await call.read() is not grpc.aio.EOF:
                            pass
                except grpc.aio.AioRpcError as error:
                    endings.append(details(error))

            async def returned() -> bool:
                return (child.rss_kib() - before_kib) * 1024 <= RSS_RETURN_BOUND

            # gRPC frees the streams' buffers once they are read; the service
            # hands free memory back to the system every 10 s.
            with contextlib.suppress(AssertionError):
                await eventually(returned, timeout=25, what="the memory to be returned")
            after_kib = child.rss_kib()
        finally:
            for call in calls:
                call.cancel()
    assert summary(endings) == {("UNAVAILABLE", "READER_STALLED"): STALLED_FOLLOWERS}
    for ending in endings:
        assert ending.error_info is not None
        position = int(ending.error_info.metadata["position"])
        assert marker <= position <= last
    growth = (after_kib - before_kib) * 1024
    assert growth <= RSS_RETURN_BOUND, f"RSS stayed {growth / MiB:.0f} MiB above its level"
