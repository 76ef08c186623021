"""UploadEvents over a real channel: client-streamed events loaded through
COPY, as they are stored, their id range, and the event limit. What uploads
share with imports (the upload_id, all or nothing, the stream limit) is in
tests/test_loads.py."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest
from google.protobuf import struct_pb2
from google.protobuf.timestamp_pb2 import Timestamp

from orderstream.events.v1 import event_service_pb2
from tests.support.apps import app_with_channel, pool_is_full
from tests.support.database import (
    copy_running,
    nothing_left_running,
    some_rows_copied,
    table_counts,
)
from tests.support.loaders import UPLOAD, event, in_messages
from tests.support.polling import eventually
from tests.support.requests import unique
from tests.support.status import rpc_error

pytestmark = pytest.mark.through_pgbouncer

Request = event_service_pb2.UploadEventsRequest


async def rows_from(admin_db, source: str) -> list:
    return await admin_db.fetch(
        "SELECT id, type, subject, time, payload::text AS payload FROM events "
        "WHERE source = $1 ORDER BY id",
        source,
    )


async def test_multi_message_upload_round_trips(channel, events, admin_db):
    source = unique("/uploads")
    when = Timestamp(seconds=1_700_000_000, nanos=123_456_789)
    batches = [
        [
            event(
                source=source,
                subject=f"things/{m}-{n}",
                json_payload=json.dumps({"m": m, "n": n}),
                **({"time": when} if n % 2 else {}),
            )
            for n in range(size)
        ]
        for m, size in enumerate((40, 1, 25))
    ]
    response = await UPLOAD.load(channel, UPLOAD.messages(unique("upload"), batches))

    assert response.event_count == 66
    rows = await rows_from(admin_db, source)
    assert len(rows) == 66
    assert (response.first_event_id, response.last_event_id) == (rows[0]["id"], rows[-1]["id"])
    # Stream order is id order.
    assert [json.loads(r["payload"]) for r in rows] == [
        {"m": m, "n": n} for m, size in enumerate((40, 1, 25)) for n in range(size)
    ]
    first = await events.GetEvent(event_service_pb2.GetEventRequest(id=response.first_event_id))
    last = await events.GetEvent(event_service_pb2.GetEventRequest(id=response.last_event_id))
    assert (first.subject, json.loads(first.json_payload)) == ("things/0-0", {"m": 0, "n": 0})
    assert (last.subject, json.loads(last.json_payload)) == ("things/2-24", {"m": 2, "n": 24})
    # A given time is kept to the microsecond; an unset one is the upload's start.
    timed = await events.GetEvent(event_service_pb2.GetEventRequest(id=rows[1]["id"]))
    assert timed.time == Timestamp(seconds=1_700_000_000, nanos=123_456_000)
    now = await admin_db.fetchval("SELECT extract(epoch FROM now())::bigint")
    assert abs(first.time.seconds - now) < 60
    assert len({r["time"] for r in rows if r["time"].year != 2023}) == 1


async def test_ids_are_drawn_at_the_end_in_stream_order(events, admin_db):
    """The upload streams into a staging table and draws its ids only once
    the client has finished: events published while it streams come before
    it, and first/last are its own smallest and largest ids, in stream order."""
    source = unique("/uploads")
    other = unique("/others")
    call = events.UploadEvents()
    await call.write(Request(upload_id=unique("upload"), events=[event(source=source)] * 3))
    await eventually(lambda: copy_running(admin_db), what="the upload to start its COPY")
    for m in range(20):
        await call.write(
            Request(
                events=[
                    event(source=source, json_payload=f'{{"n": {m * 1000 + n}}}')
                    for n in range(1000)
                ]
            )
        )
    await eventually(
        lambda: some_rows_copied(admin_db), what="rows to reach the database uncommitted"
    )
    during = await events.PublishEvents(
        event_service_pb2.PublishEventsRequest(events=[event(source=other)] * 10)
    )
    await call.done_writing()
    response = await call

    rows = await rows_from(admin_db, source)
    ours = [r["id"] for r in rows]
    assert response.event_count == len(ours) == 20_003
    assert (response.first_event_id, response.last_event_id) == (ours[0], ours[-1])
    assert max(during.ids) < response.first_event_id
    assert [json.loads(r["payload"])["n"] for r in rows] == [1, 1, 1, *range(20_000)]


async def test_struct_payloads_and_long_payloads_are_accepted(channel, admin_db):
    source = unique("/uploads")
    payload = struct_pb2.Struct()
    payload.update({"amount": 3, "ok": True, "items": ["x", "y"], "none": None})
    long_text = json.dumps({"text": "x" * 5000})
    response = await UPLOAD.load(
        channel,
        UPLOAD.messages(
            unique("upload"),
            [
                [
                    event(source=source, struct_payload=payload),
                    event(source=source, json_payload=long_text),
                ]
            ],
        ),
    )
    assert response.event_count == 2
    rows = await rows_from(admin_db, source)
    assert json.loads(rows[0]["payload"]) == {
        "amount": 3,
        "ok": True,
        "items": ["x", "y"],
        "none": None,
    }
    assert json.loads(rows[1]["payload"]) == json.loads(long_text)


async def test_more_events_than_the_limit_is_resource_exhausted(service_env, admin_db):
    async with (
        app_with_channel(service_env, ORDERSTREAM_MAX_UPLOAD_EVENTS="10") as (small, channel),
    ):
        at_limit = await UPLOAD.load(
            channel, UPLOAD.messages(unique("upload"), [[event()] * 6, [event()] * 4])
        )
        assert at_limit.event_count == 10

        before = await table_counts(admin_db)
        upload_id = unique("upload")
        error = await rpc_error(
            UPLOAD.load(channel, UPLOAD.messages(upload_id, [[event()] * 6, [event()] * 5]))
        )
        assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error.error_info.reason == "UPLOAD_TOO_LARGE"
        assert await table_counts(admin_db) == before
        assert await UPLOAD.stored(admin_db, upload_id) is None
        await eventually(lambda: pool_is_full(small), what="the connection to return")

        # A retry of a committed upload is read to its end under the same limit.
        committed = unique("upload")
        await UPLOAD.load(channel, UPLOAD.messages(committed, [[event()] * 3]))
        before = await table_counts(admin_db)
        error = await rpc_error(
            UPLOAD.load(channel, UPLOAD.messages(committed, [[event()] * 6, [event()] * 5]))
        )
        assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error.error_info.reason == "UPLOAD_TOO_LARGE"
        assert await table_counts(admin_db) == before


async def test_large_upload_in_many_messages(channel, admin_db, app):
    source = unique("/uploads-large")
    count = 200_000
    batches = in_messages(
        count,
        1000,
        lambda n: event(
            source=source,
            subject=f"things/{n % 100}",
            json_payload=f'{{"n": {n}, "kind": "small"}}',
        ),
    )
    response = await UPLOAD.load(channel, UPLOAD.messages(unique("upload"), batches))

    assert response.event_count == count
    summary = await admin_db.fetchrow(
        "SELECT count(*), min(id), max(id), "
        "min((payload->>'n')::int), max((payload->>'n')::int) FROM events WHERE source = $1",
        source,
    )
    assert tuple(summary) == (
        count,
        response.first_event_id,
        response.last_event_id,
        0,
        count - 1,
    )
    await eventually(lambda: pool_is_full(app), what="the connection to return")


async def test_unary_calls_proceed_while_uploads_stream(events, admin_db):
    """An upload in progress holds a stream slot, not the unary path."""
    call = events.UploadEvents()
    await call.write(Request(upload_id=unique("upload"), events=[event()]))
    await eventually(lambda: copy_running(admin_db), what="the upload to start")
    published = await asyncio.wait_for(
        events.PublishEvents(event_service_pb2.PublishEventsRequest(events=[event()])), 10
    )
    assert len(published.ids) == 1
    await call.done_writing()
    assert (await call).event_count == 1


async def test_a_stalled_upload_does_not_hold_the_feed_back(events, admin_db):
    """An upload whose client sent a first megabyte and then stalls (no
    deadline, no half-close) holds no feed lock: events published meanwhile
    reach a follower and a history read at once. Cancelled, it leaves nothing."""
    source = unique("/stalled")
    upload_id = unique("upload")
    start = await admin_db.fetchval("SELECT coalesce(max(id), 0) FROM events")
    follower = events.StreamEvents(
        event_service_pb2.StreamEventsRequest(after_id=start, follow=True)
    )
    call = events.UploadEvents()
    payload = json.dumps({"padding": "x" * 1000})
    await call.write(
        Request(upload_id=upload_id, events=[event(source=source, json_payload=payload)] * 1000)
    )
    await eventually(lambda: some_rows_copied(admin_db), what="the upload's rows to arrive")

    published = await events.PublishEvents(
        event_service_pb2.PublishEventsRequest(events=[event(source=unique("/others"))])
    )
    (wanted,) = published.ids

    async def followed() -> None:
        async for response in follower:
            if any(e.id == wanted for e in response.events):
                return

    await asyncio.wait_for(followed(), 10)
    history = [
        e.id
        async for response in events.StreamEvents(
            event_service_pb2.StreamEventsRequest(after_id=wanted - 1), timeout=10
        )
        for e in response.events
    ]
    assert history == [wanted]
    assert await copy_running(admin_db), "the upload is still open"

    call.cancel()
    follower.cancel()
    await eventually(lambda: nothing_left_running(admin_db), what="the upload to roll back")
    assert await admin_db.fetchval("SELECT count(*) FROM events WHERE source = $1", source) == 0
    assert await UPLOAD.stored(admin_db, upload_id) is None
