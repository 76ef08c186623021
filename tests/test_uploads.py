"""UploadEvents over a real channel: client-streamed events loaded through
COPY all or nothing, idempotent on upload_id, within the stream limits."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable, Sequence

import grpc
import pytest
from google.protobuf import struct_pb2
from google.protobuf.timestamp_pb2 import Timestamp

from orderstream.events.v1 import event_pb2, event_service_pb2, event_service_pb2_grpc
from tests.support.apps import pool_is_full, running_app
from tests.support.database import nothing_left_running, rows_copied, table_counts, waiting_on_lock
from tests.support.polling import eventually
from tests.support.requests import stream, unique
from tests.support.status import rpc_error

pytestmark = pytest.mark.through_pgbouncer

Request = event_service_pb2.UploadEventsRequest


def event(**fields: object) -> event_pb2.Event:
    values: dict[str, object] = {
        "type": "com.example.uploaded",
        "source": "/tests/uploads",
        "subject": "things/1",
        "json_payload": '{"n": 1}',
    }
    values.update(fields)
    return event_pb2.Event(**values)  # type: ignore[arg-type]


def messages(upload_id: str, batches: Iterable[Sequence[event_pb2.Event]]) -> list[Request]:
    """One request per batch; only the first carries the upload_id."""
    return [
        Request(upload_id=upload_id if n == 0 else "", events=batch)
        for n, batch in enumerate(batches)
    ]


async def upload(events, requests: Iterable[Request], **kwargs: object):
    return await events.UploadEvents(stream(requests), **kwargs)


async def stored_upload(admin_db, upload_id: str):
    return await admin_db.fetchrow("SELECT * FROM uploads WHERE upload_id = $1", upload_id)


async def rows_from(admin_db, source: str) -> list:
    return await admin_db.fetch(
        "SELECT id, type, subject, time, payload::text AS payload FROM events "
        "WHERE source = $1 ORDER BY id",
        source,
    )


async def test_multi_message_upload_round_trips(events, admin_db):
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
    upload_id = unique("upload")
    response = await upload(events, messages(upload_id, batches))

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
    stored = await stored_upload(admin_db, upload_id)
    assert (stored["event_count"], stored["first_event_id"], stored["last_event_id"]) == (
        66,
        response.first_event_id,
        response.last_event_id,
    )


async def test_id_range_is_exact_when_concurrent_writers_interleave(events, admin_db):
    """first/last are this upload's own smallest and largest ids, however many
    ids other writers drew before, between and after them."""
    source = unique("/uploads")
    other = unique("/others")
    call = events.UploadEvents()
    # A few rows only: asyncpg holds them until its buffer fills, so no id is
    # drawn for the upload yet when the COPY starts.
    await call.write(Request(upload_id=unique("upload"), events=[event(source=source)] * 3))
    await eventually(lambda: _copy_running(admin_db), what="the upload to start its COPY")
    before = []
    for _ in range(3):  # more than one page of other writers' ids to step over
        published = await events.PublishEvents(
            event_service_pb2.PublishEventsRequest(events=[event(source=other)] * 1000)
        )
        before.extend(published.ids)
    for _ in range(20):
        await call.write(Request(events=[event(source=source)] * 1000))
    await eventually(
        lambda: _some_rows_copied(admin_db), what="rows to reach the database uncommitted"
    )
    between = await events.PublishEvents(
        event_service_pb2.PublishEventsRequest(events=[event(source=other)])
    )
    await call.write(Request(events=[event(source=source)] * 1000))
    await call.done_writing()
    response = await call

    ours = [r["id"] for r in await rows_from(admin_db, source)]
    assert response.event_count == len(ours) == 21_003
    assert (response.first_event_id, response.last_event_id) == (ours[0], ours[-1])
    assert max(before) < response.first_event_id
    assert response.first_event_id < between.ids[0] < response.last_event_id


async def test_struct_payloads_and_long_payloads_are_accepted(events, admin_db):
    source = unique("/uploads")
    payload = struct_pb2.Struct()
    payload.update({"amount": 3, "ok": True, "items": ["x", "y"], "none": None})
    long_text = json.dumps({"text": "x" * 5000})
    response = await upload(
        events,
        messages(
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


async def test_upload_of_no_events_is_recorded(events, admin_db):
    upload_id = unique("upload")
    before = await table_counts(admin_db)
    response = await upload(events, [Request(upload_id=upload_id), Request()])
    assert response == event_service_pb2.UploadEventsResponse()
    assert await table_counts(admin_db) == before
    assert (await stored_upload(admin_db, upload_id))["event_count"] == 0
    again = await upload(events, messages(upload_id, [[event()]]))
    assert again == response
    assert await table_counts(admin_db) == before


# (fields of the bad event, the field its violation names). Each kind is
# caught either by PostgreSQL during COPY or by the service before it.
BAD_EVENTS: list[tuple[dict[str, object], str]] = [
    ({"type": ""}, "type"),
    ({"type": "a\x00b"}, "type"),
    ({"type": "t" * 257}, "type"),
    ({"source": ""}, "source"),
    ({"source": "/s\x00"}, "source"),
    ({"source": "s" * 1025}, "source"),
    ({"subject": "s\x00"}, "subject"),
    ({"subject": "s" * 1025}, "subject"),
    ({"time": Timestamp(seconds=253_402_300_800)}, "time"),
    ({"time": Timestamp(seconds=-62_135_596_801)}, "time"),
    ({"time": Timestamp(seconds=0, nanos=-1)}, "time"),
    ({"json_payload": ""}, "json_payload"),
    ({"json_payload": "{"}, "json_payload"),
    ({"json_payload": "[1, 2]"}, "json_payload"),
    ({"json_payload": '"text"'}, "json_payload"),
    ({"json_payload": '{"x": NaN}'}, "json_payload"),
    ({"json_payload": '{"x": Infinity}'}, "json_payload"),
    ({"json_payload": '{"x": "\\u0000"}'}, "json_payload"),
    ({"json_payload": '{"\\u0000": 1}'}, "json_payload"),
    ({"json_payload": '{"x": "a\x00"}'}, "json_payload"),
    ({"json_payload": '{"x": "\\ud800"}'}, "json_payload"),
    ({"json_payload": '{"x": 1} trailing'}, "json_payload"),
    ({"json_payload": '{"x": "' + "y" * 2000 + '"'}, "json_payload"),
    ({"json_payload": "[" * 100_000 + "]" * 100_000}, "json_payload"),
    ({"json_payload": '{"a":' * 5000 + "1" + "}" * 5000}, "json_payload"),
    ({"json_payload": json.dumps({"x": "y" * (1 << 20)})}, "json_payload"),
    # Under the limit in characters, over it in bytes.
    ({"json_payload": json.dumps({"x": "é" * 600_000}, ensure_ascii=False)}, "json_payload"),
    # 24 KB as sent; over 1 MiB as PostgreSQL writes the numbers out.
    ({"json_payload": '{"x": [' + ",".join(["1e300"] * 4000) + "]}"}, "json_payload"),
    (
        {
            "struct_payload": struct_pb2.Struct(
                fields={
                    "x": struct_pb2.Value(
                        list_value=struct_pb2.ListValue(
                            values=[struct_pb2.Value(number_value=1e300)] * 4000
                        )
                    )
                }
            )
        },
        "struct_payload",
    ),
    (
        {
            "struct_payload": struct_pb2.Struct(
                fields={"x": struct_pb2.Value(number_value=float("nan"))}
            )
        },
        "struct_payload",
    ),
]


def _bad_event_id(case: tuple[dict[str, object], str]) -> str:
    fields, field = case
    value = next(iter(fields.values()))
    return f"{field}:{str(value)[:24]!r}"


@pytest.mark.parametrize(("fields", "field"), BAD_EVENTS, ids=map(_bad_event_id, BAD_EVENTS))
async def test_one_bad_event_rejects_the_whole_upload(events, admin_db, fields, field):
    before = await table_counts(admin_db)
    upload_id = unique("upload")
    batches = [[event() for _ in range(5)] for _ in range(3)]
    batches[1][2] = event(**fields)
    error = await rpc_error(upload(events, messages(upload_id, batches)))

    assert error.code == grpc.StatusCode.INVALID_ARGUMENT, error.message
    assert error.error_info.reason == "INVALID_FIELD"
    assert list(error.violations) == [f"messages[1].events[2].{field}"], error.violations
    assert await table_counts(admin_db) == before
    assert await stored_upload(admin_db, upload_id) is None


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        (event(json_payload="[]"), "json_payload"),  # found by PostgreSQL
        (event(time=Timestamp(seconds=2**40)), "time"),  # found by the service
    ],
    ids=["database", "service"],
)
async def test_bad_event_is_located_across_uneven_messages(events, admin_db, bad, field):
    before = await table_counts(admin_db)
    sizes = (3, 0, 7, 7, 7, 2, 500, 500, 1)
    batches = [[event() for _ in range(size)] for size in sizes]
    batches[7][321] = bad
    error = await rpc_error(upload(events, messages(unique("upload"), batches)))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert list(error.violations) == [f"messages[7].events[321].{field}"]
    assert await table_counts(admin_db) == before


@pytest.mark.parametrize(
    ("requests", "field"),
    [
        ([], "messages"),
        ([Request(events=[event()])], "messages[0].upload_id"),
        ([Request(upload_id="u" * 129, events=[event()])], "messages[0].upload_id"),
        ([Request(upload_id="a\x00b", events=[event()])], "messages[0].upload_id"),
        (
            [
                Request(upload_id="first", events=[event()]),
                Request(upload_id="", events=[event()]),
                Request(upload_id="other", events=[event()]),
            ],
            "messages[2].upload_id",
        ),
    ],
    ids=["empty-stream", "missing", "too-long", "nul", "changed"],
)
async def test_upload_id_is_required_first_and_unchanged(events, admin_db, requests, field):
    before = await table_counts(admin_db)
    if requests and requests[0].upload_id == "first":
        requests[0].upload_id = unique("upload")
    error = await rpc_error(upload(events, requests))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert list(error.violations) == [field]
    assert await table_counts(admin_db) == before
    if field == "messages[2].upload_id":  # the only case with a valid id to claim
        assert await stored_upload(admin_db, requests[0].upload_id) is None


async def test_retry_after_commit_returns_the_first_response(events, admin_db):
    upload_id = unique("upload")
    source = unique("/uploads")
    first = await upload(
        events, messages(upload_id, [[event(source=source) for _ in range(10)]] * 2)
    )
    before = await table_counts(admin_db)
    # Same id, other events: the stored response, nothing written.
    retried = await upload(
        events, messages(upload_id, [[event(source=unique("/uploads")) for _ in range(3)]])
    )
    assert retried == first
    assert first.event_count == 20
    assert await table_counts(admin_db) == before
    assert len(await rows_from(admin_db, source)) == 20


async def test_concurrent_uploads_with_one_id_commit_once(events, admin_db, app):
    """The second waits for the first's claim and returns its response."""
    upload_id = unique("upload")
    source_a, source_b = unique("/uploads-a"), unique("/uploads-b")
    call_a = events.UploadEvents()
    await call_a.write(Request(upload_id=upload_id, events=[event(source=source_a)] * 50))
    await eventually(lambda: _copy_running(admin_db), what="the first upload to start its COPY")

    call_b = events.UploadEvents(stream(messages(upload_id, [[event(source=source_b)] * 30])))
    await eventually(
        lambda: waiting_on_lock(admin_db, "INSERT INTO uploads"),
        what="the second upload to wait for the first's claim",
    )
    await call_a.write(Request(events=[event(source=source_a)] * 50))
    await call_a.done_writing()
    response_a = await call_a
    response_b = await call_b

    assert response_a.event_count == 100
    assert response_b == response_a
    assert len(await rows_from(admin_db, source_a)) == 100
    assert await rows_from(admin_db, source_b) == []
    await eventually(lambda: pool_is_full(app), what="connections to return")


async def test_concurrent_upload_loads_its_own_events_when_the_first_fails(events, admin_db, app):
    upload_id = unique("upload")
    source_a, source_b = unique("/uploads-a"), unique("/uploads-b")
    call_a = events.UploadEvents()
    await call_a.write(Request(upload_id=upload_id, events=[event(source=source_a)] * 50))
    await eventually(lambda: _copy_running(admin_db), what="the first upload to start its COPY")
    call_b = events.UploadEvents(stream(messages(upload_id, [[event(source=source_b)] * 30])))
    await eventually(
        lambda: waiting_on_lock(admin_db, "INSERT INTO uploads"),
        what="the second upload to wait for the first's claim",
    )
    call_a.cancel()
    response_b = await call_b

    assert await call_a.code() == grpc.StatusCode.CANCELLED
    assert response_b.event_count == 30
    assert await rows_from(admin_db, source_a) == []
    assert len(await rows_from(admin_db, source_b)) == 30
    await eventually(lambda: pool_is_full(app), what="connections to return")


async def test_waiting_longer_than_the_statement_timeout_is_aborted(service_env, admin_db):
    async with (
        running_app(service_env, ORDERSTREAM_COMMAND_TIMEOUT="1") as small,
        grpc.aio.insecure_channel(f"127.0.0.1:{small.port}") as channel,
    ):
        stub = event_service_pb2_grpc.EventServiceStub(channel)
        upload_id = unique("upload")
        held = stub.UploadEvents()
        await held.write(Request(upload_id=upload_id, events=[event()]))
        await eventually(lambda: _copy_running(admin_db), what="the first upload to start")

        error = await rpc_error(upload(stub, messages(upload_id, [[event()]])))
        assert error.code == grpc.StatusCode.ABORTED
        assert error.error_info.reason == "UPLOAD_IN_PROGRESS"
        assert error.retry_info is not None

        await held.done_writing()
        first = await held
        assert await upload(stub, messages(upload_id, [[event()]])) == first
        await eventually(lambda: pool_is_full(small), what="connections to return")


async def _copy_running(admin_db) -> bool:
    return (
        await admin_db.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'orderstream' "
            "AND state = 'active' AND query LIKE 'COPY%'"
        )
        > 0
    )


async def test_client_cancel_mid_stream_leaves_nothing(events, admin_db, app):
    before = await table_counts(admin_db)
    upload_id = unique("upload")
    call = events.UploadEvents()
    await call.write(Request(upload_id=upload_id, events=[event()] * 1000))
    # Enough rows that some have reached PostgreSQL (asyncpg sends in chunks).
    for _ in range(19):
        await call.write(Request(events=[event()] * 1000))
    await eventually(
        lambda: _some_rows_copied(admin_db), what="rows to reach the database uncommitted"
    )
    call.cancel()

    assert await call.code() == grpc.StatusCode.CANCELLED
    await eventually(lambda: pool_is_full(app), what="the connection to return")
    await eventually(lambda: nothing_left_running(admin_db), what="the COPY to end")
    assert await table_counts(admin_db) == before
    assert await stored_upload(admin_db, upload_id) is None


async def _some_rows_copied(admin_db) -> bool:
    return await rows_copied(admin_db) > 0


async def test_lost_client_connection_mid_stream_leaves_nothing(admin_db, app):
    before = await table_counts(admin_db)
    upload_id = unique("upload")
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    call = event_service_pb2_grpc.EventServiceStub(channel).UploadEvents()
    for n in range(20):
        await call.write(Request(upload_id=upload_id if n == 0 else "", events=[event()] * 1000))
    await eventually(
        lambda: _some_rows_copied(admin_db), what="rows to reach the database uncommitted"
    )
    await channel.close()  # the HTTP/2 connection goes away under the stream

    await eventually(lambda: pool_is_full(app), what="the connection to return")
    await eventually(lambda: nothing_left_running(admin_db), what="the COPY to end")
    assert await table_counts(admin_db) == before
    assert await stored_upload(admin_db, upload_id) is None


async def test_deadline_mid_stream_leaves_nothing(events, admin_db, app):
    before = await table_counts(admin_db)
    upload_id = unique("upload")
    call = events.UploadEvents(timeout=5)
    for n in range(20):
        await call.write(Request(upload_id=upload_id if n == 0 else "", events=[event()] * 1000))
    await eventually(
        lambda: _some_rows_copied(admin_db), what="rows to reach the database uncommitted"
    )
    # The client stalls without half-closing; the deadline ends the upload.
    error = await rpc_error(call)

    assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED
    await eventually(lambda: pool_is_full(app), what="the connection to return")
    await eventually(lambda: nothing_left_running(admin_db), what="the COPY to end")
    assert await table_counts(admin_db) == before
    assert await stored_upload(admin_db, upload_id) is None


async def test_more_events_than_the_limit_is_resource_exhausted(service_env, admin_db):
    async with (
        running_app(service_env, ORDERSTREAM_MAX_UPLOAD_EVENTS="10") as small,
        grpc.aio.insecure_channel(f"127.0.0.1:{small.port}") as channel,
    ):
        stub = event_service_pb2_grpc.EventServiceStub(channel)
        at_limit = await upload(stub, messages(unique("upload"), [[event()] * 6, [event()] * 4]))
        assert at_limit.event_count == 10

        before = await table_counts(admin_db)
        upload_id = unique("upload")
        error = await rpc_error(upload(stub, messages(upload_id, [[event()] * 6, [event()] * 5])))
        assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error.error_info.reason == "UPLOAD_TOO_LARGE"
        assert await table_counts(admin_db) == before
        assert await stored_upload(admin_db, upload_id) is None
        await eventually(lambda: pool_is_full(small), what="the connection to return")


async def test_uploads_beyond_the_stream_limit_are_refused_with_retry_info(service_env, admin_db):
    async with (
        running_app(service_env, ORDERSTREAM_MAX_STREAMS="1") as small,
        grpc.aio.insecure_channel(f"127.0.0.1:{small.port}") as channel,
    ):
        stub = event_service_pb2_grpc.EventServiceStub(channel)
        held = stub.UploadEvents()
        await held.write(Request(upload_id=unique("upload"), events=[event()]))
        await eventually(lambda: _copy_running(admin_db), what="the first upload to start")

        error = await rpc_error(upload(stub, messages(unique("upload"), [[event()]])))
        assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error.error_info.reason == "TOO_MANY_STREAMS"
        assert error.retry_info is not None

        await held.done_writing()
        assert (await held).event_count == 1
        # The slot is free again.
        assert (await upload(stub, messages(unique("upload"), [[event()]]))).event_count == 1


async def test_large_upload_in_many_messages(events, admin_db, app):
    source = unique("/uploads-large")
    per_message, count = 1000, 200_000
    requests = [
        Request(
            upload_id=unique("upload") if m == 0 else "",
            events=[
                event(
                    source=source,
                    subject=f"things/{n % 100}",
                    json_payload=f'{{"n": {m * per_message + n}, "kind": "small"}}',
                )
                for n in range(per_message)
            ],
        )
        for m in range(count // per_message)
    ]
    response = await upload(events, requests)

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
    await eventually(lambda: _copy_running(admin_db), what="the upload to start")
    published = await asyncio.wait_for(
        events.PublishEvents(event_service_pb2.PublishEventsRequest(events=[event()])), 10
    )
    assert len(published.ids) == 1
    await call.done_writing()
    assert (await call).event_count == 1
