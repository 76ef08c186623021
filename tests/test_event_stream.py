"""StreamEvents: history through a cursor, the gap-free horizon under
reordered commits, follow mode, limits, cancel and shutdown."""

from __future__ import annotations

import asyncio
import json
import tracemalloc

import grpc
import pytest

from orderstream.events.v1 import event_pb2, event_service_pb2, event_service_pb2_grpc
from orderstream.orders.v1 import order_service_pb2, order_service_pb2_grpc
from service.app import App
from service.events import sql as events_sql
from service.settings import Settings
from tests.support.apps import app_with_channel, pool_is_full
from tests.support.calls import new_event, publish, read_all
from tests.support.polling import eventually
from tests.support.requests import create_request, unique
from tests.support.status import rpc_error

pytestmark = pytest.mark.through_pgbouncer

INSERT_EVENT = """
INSERT INTO events (type, source, subject, time, payload)
VALUES ('test.reordered', '/tests', $1, now(), '{}') RETURNING id
"""


async def no_open_transactions(admin_db) -> bool:
    return (
        await admin_db.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'orderstream' "
            "AND state LIKE 'idle in transaction%'"
        )
        == 0
    )


async def test_history_streams_matching_events_in_order(events):
    subject = unique("stream/")
    ids = await publish(events, subject, 30)
    await publish(events, unique("other/"), 5)
    received, _ = await read_all(
        events.StreamEvents(event_service_pb2.StreamEventsRequest(subject=subject))
    )
    assert [e.id for e in received] == ids
    assert [json.loads(e.json_payload)["n"] for e in received] == list(range(30))
    assert all(e.type == "test.streamed" and e.time.seconds > 0 for e in received)


async def test_history_resumes_after_an_id(events):
    subject = unique("stream/")
    ids = await publish(events, subject, 20)
    received, _ = await read_all(
        events.StreamEvents(event_service_pb2.StreamEventsRequest(after_id=ids[9], subject=subject))
    )
    assert [e.id for e in received] == ids[10:]


async def test_types_filter(events):
    subject = unique("stream/")
    wanted = await publish(events, subject, 3)
    other = event_pb2.Event(type="test.other", source="/t", subject=subject, json_payload="{}")
    await events.PublishEvents(event_service_pb2.PublishEventsRequest(events=[other]))
    received, _ = await read_all(
        events.StreamEvents(
            event_service_pb2.StreamEventsRequest(subject=subject, types=["test.streamed", "x.y"])
        )
    )
    assert [e.id for e in received] == wanted


async def test_every_form_of_types_filter_streams_the_same_events_in_order(events):
    """One type, a few (read as one ordered scan per type, merged; a repeat
    counts once) and more than that (`type = ANY`) each have a statement of
    their own (service/events/sql.py); all must stream the same events. No
    subject, so each reads the feed by type alone."""
    kinds = [unique("test.kind") for _ in range(3)]
    batch = [
        event_pb2.Event(type=kinds[n % 3], source="/t", json_payload=json.dumps({"n": n}))
        for n in range(30)
    ]
    response = await events.PublishEvents(event_service_pb2.PublishEventsRequest(events=batch))
    of_kind = {
        kind: [i for n, i in enumerate(response.ids) if n % 3 == k] for k, kind in enumerate(kinds)
    }
    absent = [unique("test.absent") for _ in range(events_sql.MERGED_TYPES)]

    async def streamed(types: list[str]) -> list[int]:
        request = event_service_pb2.StreamEventsRequest(after_id=response.ids[0] - 1, types=types)
        return [e.id for e in (await read_all(events.StreamEvents(request)))[0]]

    assert await streamed([kinds[1]]) == of_kind[kinds[1]]
    both = sorted(of_kind[kinds[0]] + of_kind[kinds[2]])
    assert await streamed([kinds[2], kinds[0], kinds[2]]) == both
    assert await streamed([kinds[0], kinds[2], *absent]) == both


async def test_many_events_per_message_within_the_byte_budget(service_env, events):
    subject = unique("stream/")
    budget = 4096
    # Two events larger than the whole budget among small ones: each must
    # travel alone, and no other message may exceed the budget.
    big = json.dumps({"blob": "x" * (budget + 500)})
    batch = [new_event(subject, n) for n in range(250)]
    batch[100:100] = [
        event_pb2.Event(type="test.streamed", source="/tests", subject=subject, json_payload=big)
        for _ in range(2)
    ]
    response = await events.PublishEvents(event_service_pb2.PublishEventsRequest(events=batch))
    ids = list(response.ids)
    async with (
        app_with_channel(service_env, ORDERSTREAM_STREAM_BATCH_BYTES=str(budget)) as (_, channel),
    ):
        stub = event_service_pb2_grpc.EventServiceStub(channel)
        messages = [
            response
            async for response in stub.StreamEvents(
                event_service_pb2.StreamEventsRequest(subject=subject)
            )
        ]
    assert [e.id for m in messages for e in m.events] == ids
    oversized = [m for m in messages if m.ByteSize() > budget]
    assert [[e.id for e in m.events] for m in oversized] == [[ids[100]], [ids[101]]]
    assert len(ids) / len(messages) > 5, "expected many events per message"


async def test_reordered_commits_are_never_skipped(events, admin_db, pg_cluster):
    """A lower id committed after a higher one must not be jumped over."""
    subject = unique("reordered/")
    async with admin_db.acquire() as slow_writer:
        transaction = slow_writer.transaction()
        await transaction.start()
        try:
            low = await slow_writer.fetchval(INSERT_EVENT, subject)
            high = await admin_db.fetchval(INSERT_EVENT, subject)  # commits at once
            assert high > low
            # The hazard is real: a plain read now sees the higher id alone.
            visible = await admin_db.fetch("SELECT id FROM events WHERE subject = $1", subject)
            assert [r["id"] for r in visible] == [high]

            received, _ = await read_all(
                events.StreamEvents(
                    event_service_pb2.StreamEventsRequest(after_id=low - 1, subject=subject)
                )
            )
            assert received == [], "streamed past an id that was still in flight"
        finally:
            await transaction.commit()
    received, _ = await read_all(
        events.StreamEvents(
            event_service_pb2.StreamEventsRequest(after_id=low - 1, subject=subject)
        )
    )
    assert [e.id for e in received] == [low, high]


async def test_follower_waits_for_a_reordered_commit_then_gets_both_in_order(events, admin_db):
    subject = unique("reordered/")
    call = events.StreamEvents(event_service_pb2.StreamEventsRequest(subject=subject, follow=True))
    async with admin_db.acquire() as slow_writer:
        transaction = slow_writer.transaction()
        await transaction.start()
        low = await slow_writer.fetchval(INSERT_EVENT, subject)
        high = await admin_db.fetchval(INSERT_EVENT, subject)
        # Give the follower a wake-up while `low` is still in flight: it must
        # not deliver `high` yet.
        await publish(events, unique("noise/"), 1)
        await transaction.commit()
    await publish(events, unique("noise/"), 1)  # wakes local followers
    first = await call.read()
    received = list(first.events)
    while len(received) < 2:
        received.extend((await call.read()).events)
    call.cancel()
    assert [e.id for e in received] == [low, high]


async def test_follow_hands_over_from_history_without_gap_or_duplicate(events):
    subject = unique("follow/")
    before = await publish(events, subject, 40)
    stop = asyncio.Event()
    published: list[int] = list(before)

    async def keep_publishing() -> None:
        while not stop.is_set():
            published.extend(await publish(events, subject, 7))

    writer = asyncio.create_task(keep_publishing())
    call = events.StreamEvents(event_service_pb2.StreamEventsRequest(subject=subject, follow=True))
    received: list[int] = []
    try:
        async for response in call:
            received.extend(e.id for e in response.events)
            if len(received) >= 300:
                stop.set()
                break
        await writer
        # Drain what was published after we stopped counting.
        async for response in call:
            received.extend(e.id for e in response.events)
            if len(received) >= len(published):
                break
    finally:
        stop.set()
        call.cancel()
        await writer
    assert received == sorted(set(received)), "duplicate or out of order"
    assert received == published


async def test_followers_on_another_replica_are_woken_by_notify(service_env, events):
    """With the fallback poll at a minute, only NOTIFY can deliver in time."""
    subject = unique("notify/")
    async with (
        app_with_channel(service_env, ORDERSTREAM_FOLLOW_POLL_INTERVAL="60") as (replica, channel),
    ):
        stub = event_service_pb2_grpc.EventServiceStub(channel)
        call = stub.StreamEvents(
            event_service_pb2.StreamEventsRequest(subject=subject, follow=True), timeout=20
        )
        await eventually(lambda: _following(replica), what="the follower to start")
        ids = await publish(events, subject, 3)  # through the other replica
        received: list[int] = []
        while len(received) < 3:
            received.extend(e.id for e in (await call.read()).events)
        call.cancel()
    assert received == ids


async def _following(app) -> bool:
    """A follower takes its slot only once its history is done."""
    return app.followers.in_use == 1


async def test_an_aged_connection_moves_new_calls_and_keeps_its_followers(service_env, events):
    """ORDERSTREAM_MAX_CONNECTION_AGE: the server's GOAWAY sends the client's
    new calls over a new connection (where kube-proxy may pick another pod),
    while a follow stream on the old one runs on."""
    subject = unique("aged/")
    async with (
        app_with_channel(service_env, ORDERSTREAM_MAX_CONNECTION_AGE="1") as (aging, channel),
    ):
        stub = event_service_pb2_grpc.EventServiceStub(channel)
        call = stub.StreamEvents(
            event_service_pb2.StreamEventsRequest(subject=subject, follow=True)
        )
        await eventually(lambda: _following_at_least_one(aging), what="the follower to start")
        assert channel.get_state() == grpc.ChannelConnectivity.READY
        async with asyncio.timeout(30):
            await channel.wait_for_state_change(grpc.ChannelConnectivity.READY)  # GOAWAY
        ids = await publish(events, subject, 2)
        received = []
        while len(received) < 2:
            received.extend((await call.read()).events)
        assert [e.id for e in received] == ids
        # A new call opens a new connection and works.
        got = await stub.GetEvent(event_service_pb2.GetEventRequest(id=ids[0]), timeout=10)
        assert got.id == ids[0]
        call.cancel()


async def test_follow_ends_at_the_deadline_and_returns_everything(app, events, admin_db):
    subject = unique("deadline/")
    call = events.StreamEvents(
        event_service_pb2.StreamEventsRequest(subject=subject, follow=True), timeout=1.0
    )
    error = await rpc_error(read_all(call))
    assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED
    await eventually(lambda: pool_is_full(app), what="connections to return")
    await eventually(lambda: no_open_transactions(admin_db), what="transactions to end")


async def test_shutdown_ends_followers_unavailable(service_env, events):
    subject = unique("shutdown/")
    app = await App.start(Settings.from_env(service_env))
    stopped = False
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            stub = event_service_pb2_grpc.EventServiceStub(channel)
            call = stub.StreamEvents(
                event_service_pb2.StreamEventsRequest(subject=subject, follow=True)
            )
            ids = await publish(events, subject, 2)
            received = []
            while len(received) < 2:
                received.extend(e.id for e in (await call.read()).events)
            assert received == ids
            await app.stop(grace=5)
            stopped = True
            error = await rpc_error(read_all(call))
            assert error.code == grpc.StatusCode.UNAVAILABLE
            assert error.error_info.reason == "SHUTTING_DOWN"
    finally:
        if not stopped:
            await app.stop(grace=1)


async def test_streams_over_the_limit_fail_fast_and_unary_calls_still_work(
    service_env, events, admin_db
):
    subject = unique("limit/")
    for _ in range(4):
        await publish(events, subject, 1000)
    async with app_with_channel(
        service_env, ORDERSTREAM_MAX_STREAMS="1", ORDERSTREAM_STREAM_BATCH_BYTES="2048"
    ) as (limited, channel):
        stub = event_service_pb2_grpc.EventServiceStub(channel)
        # A reader that stops reading: the server blocks in write() holding
        # its stream slot and connection.
        stalled = stub.StreamEvents(event_service_pb2.StreamEventsRequest(subject=subject))
        await stalled.read()
        error = await rpc_error(
            read_all(stub.StreamEvents(event_service_pb2.StreamEventsRequest(subject=subject)))
        )
        assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error.error_info.reason == "TOO_MANY_STREAMS"
        assert error.retry_info is not None
        orders = order_service_pb2_grpc.OrderServiceStub(channel)
        created = await orders.CreateOrder(create_request(), timeout=5)
        assert (await orders.GetOrder(order_service_pb2.GetOrderRequest(id=created.id))).id
        stalled.cancel()
        await eventually(lambda: pool_is_full(limited), what="the stalled stream's connection")
        received, _ = await read_all(
            stub.StreamEvents(event_service_pb2.StreamEventsRequest(subject=subject))
        )
        assert len(received) == 4000


async def test_cancel_mid_history_returns_the_connection(app, events, admin_db):
    subject = unique("cancel/")
    for _ in range(3):
        await publish(events, subject, 1000)
    for _ in range(20):
        call = events.StreamEvents(event_service_pb2.StreamEventsRequest(subject=subject))
        await call.read()
        call.cancel()
    await eventually(lambda: pool_is_full(app), what="connections to return")
    await eventually(lambda: no_open_transactions(admin_db), what="transactions to end")


PAUSED_EVENTS = 120_000  # about 70 MB as messages: more than any transport buffers


async def test_a_reader_that_stops_holds_the_cursor_back_until_the_deadline(app, events, admin_db):
    """Back-pressure: a caller that stops reading stops the cursor. The
    handler waits in context.write once HTTP/2 flow control and the socket
    buffers are full, so the history cannot finish (it would, well within the
    deadline, if rows were buffered in the server), the server's memory does
    not grow with the stream, and the deadline still ends the call and
    returns the connection."""
    subject = unique("paused/")
    await admin_db.execute(
        "INSERT INTO events (type, source, subject, time, payload) "
        "SELECT 'test.paused', '/tests', $1, now(), jsonb_build_object('n', n, 'pad', $2::text) "
        "FROM generate_series(1, $3) AS n",
        subject,
        "x" * 500,
        PAUSED_EVENTS,
    )
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        call = events.StreamEvents(
            event_service_pb2.StreamEventsRequest(subject=subject), timeout=5
        )
        await call.read()
        # The status arrives without reading another message.
        code = await call.code()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    # Two fetches of rows and a message or two, far from the ~70 MB the
    # whole history would take.
    assert peak - before < 32 << 20, f"{(peak - before) >> 20} MiB held by the stream"
    await eventually(lambda: pool_is_full(app), what="the connection to return")
    await eventually(lambda: no_open_transactions(admin_db), what="the transaction to end")


async def test_cancelled_follower_gives_back_its_place(app, events, admin_db):
    subject = unique("follow-cancel/")
    call = events.StreamEvents(event_service_pb2.StreamEventsRequest(subject=subject, follow=True))
    await eventually(lambda: _following_at_least_one(app), what="the follower to start")
    call.cancel()
    assert await call.code() == grpc.StatusCode.CANCELLED
    await eventually(lambda: _no_followers(app), what="the follower's place to be given back")
    await eventually(lambda: pool_is_full(app), what="connections to return")
    assert await no_open_transactions(admin_db)


async def test_invalid_stream_requests(events):
    cases = [
        (event_service_pb2.StreamEventsRequest(after_id=-1), "after_id"),
        (event_service_pb2.StreamEventsRequest(subject="a\x00"), "subject"),
        (event_service_pb2.StreamEventsRequest(types=[""]), "types[0]"),
        (event_service_pb2.StreamEventsRequest(types=["t"] * 101), "types"),
    ]
    for request, field in cases:
        error = await rpc_error(read_all(events.StreamEvents(request)))
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT
        assert field in error.violations


async def test_events_written_outside_the_service_reach_idle_followers(app, events, admin_db):
    """No announcement and no NOTIFY: the feed's own horizon check (one
    query per process and poll interval) must wake the follower."""
    subject = unique("outside/")
    call = events.StreamEvents(event_service_pb2.StreamEventsRequest(subject=subject, follow=True))
    await eventually(lambda: _following_at_least_one(app), what="the follower to start")
    written = await admin_db.fetchval(INSERT_EVENT, subject)
    response = await call.read()
    call.cancel()
    assert [e.id for e in response.events] == [written]


async def _following_at_least_one(app) -> bool:
    return app.followers.in_use >= 1


async def _no_followers(app) -> bool:
    return app.followers.in_use == 0
