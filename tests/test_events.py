"""EventService over a real channel: publish, get, payload forms, bad input."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest
from google.protobuf import struct_pb2
from google.protobuf.timestamp_pb2 import Timestamp

from orderstream.events.v1 import event_pb2, event_service_pb2
from tests.support.database import table_counts
from tests.support.loaders import BAD_EVENT_KINDS, SPACED_OUT_PAYLOAD
from tests.support.requests import create_request, unique
from tests.support.status import rpc_error

pytestmark = pytest.mark.through_pgbouncer


def event(**fields: object) -> event_pb2.Event:
    values: dict[str, object] = {
        "type": "com.example.thing_happened",
        "source": "/tests",
        "subject": unique("things/"),
        "json_payload": '{"n": 1}',
    }
    values.update(fields)
    return event_pb2.Event(**values)  # type: ignore[arg-type]


async def test_publish_returns_increasing_ids_in_request_order(events):
    batch = [event(json_payload=json.dumps({"n": n})) for n in range(25)]
    response = await events.PublishEvents(event_service_pb2.PublishEventsRequest(events=batch))
    assert len(response.ids) == 25
    assert list(response.ids) == sorted(response.ids)
    for n, ident in enumerate(response.ids):
        got = await events.GetEvent(event_service_pb2.GetEventRequest(id=ident))
        assert json.loads(got.json_payload) == {"n": n}
        assert got.subject == batch[n].subject


async def test_get_event_round_trips_every_field(events):
    sent = event(
        subject=unique("invoices/"),
        time=Timestamp(seconds=1_700_000_000, nanos=123_456_000),
        json_payload='{"amount": 3, "tags": ["a", "b"], "nested": {"ok": true}}',
    )
    (ident,) = (
        await events.PublishEvents(event_service_pb2.PublishEventsRequest(events=[sent]))
    ).ids
    got = await events.GetEvent(event_service_pb2.GetEventRequest(id=ident))
    assert got.id == ident
    assert (got.type, got.source, got.subject) == (sent.type, sent.source, sent.subject)
    assert got.time == sent.time
    assert json.loads(got.json_payload) == json.loads(sent.json_payload)


async def test_time_defaults_to_the_write_time(events, admin_db):
    (ident,) = (
        await events.PublishEvents(event_service_pb2.PublishEventsRequest(events=[event()]))
    ).ids
    got = await events.GetEvent(event_service_pb2.GetEventRequest(id=ident))
    now = await admin_db.fetchval("SELECT extract(epoch FROM now())::bigint")
    assert abs(got.time.seconds - now) < 60


async def test_struct_payload_is_accepted_and_returned_as_json(events):
    payload = struct_pb2.Struct()
    payload.update({"amount": 3, "ok": True, "items": ["x", "y"], "none": None})
    (ident,) = (
        await events.PublishEvents(
            event_service_pb2.PublishEventsRequest(events=[event(struct_payload=payload)])
        )
    ).ids
    got = await events.GetEvent(event_service_pb2.GetEventRequest(id=ident))
    assert json.loads(got.json_payload) == {
        "amount": 3,
        "ok": True,
        "items": ["x", "y"],
        "none": None,
    }


async def test_get_missing_event_is_not_found(events):
    error = await rpc_error(events.GetEvent(event_service_pb2.GetEventRequest(id=2**62)))
    assert error.code == grpc.StatusCode.NOT_FOUND
    assert error.error_info.reason == "EVENT_NOT_FOUND"


@pytest.mark.parametrize("bad_id", [0, -5])
async def test_get_event_rejects_non_positive_ids(events, bad_id):
    error = await rpc_error(events.GetEvent(event_service_pb2.GetEventRequest(id=bad_id)))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(("fields", "field"), BAD_EVENT_KINDS)
async def test_one_bad_event_rejects_the_whole_batch(events, admin_db, fields, field):
    before = await table_counts(admin_db)
    batch = [event(), event(), event(**fields)]
    error = await rpc_error(
        events.PublishEvents(event_service_pb2.PublishEventsRequest(events=batch))
    )
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert f"events[2].{field}" in error.violations, error.violations
    assert await table_counts(admin_db) == before


async def test_a_payload_only_the_database_finds_too_large_is_named(events, admin_db):
    """The table's size CHECK refuses what Python let through; the call
    still names each offending event, never a constraint violation."""
    before = await table_counts(admin_db)
    struct = struct_pb2.Struct()
    struct.update({"n": 1})
    batch = [
        event(json_payload=SPACED_OUT_PAYLOAD),
        event(struct_payload=struct),
        event(json_payload=SPACED_OUT_PAYLOAD),
    ]
    error = await rpc_error(
        events.PublishEvents(event_service_pb2.PublishEventsRequest(events=batch))
    )
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.error_info.reason == "INVALID_FIELD"
    assert list(error.violations) == ["events[0].json_payload", "events[2].json_payload"]
    assert "as PostgreSQL writes it out" in error.violations["events[0].json_payload"]
    assert await table_counts(admin_db) == before


async def test_missing_payload_is_invalid_argument(events):
    bare = event_pb2.Event(type="t", source="/s")
    error = await rpc_error(
        events.PublishEvents(event_service_pb2.PublishEventsRequest(events=[bare]))
    )
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "required" in error.violations["events[0].json_payload"]


@pytest.mark.parametrize("count", [0, 1001])
async def test_publish_accepts_1_to_1000_events(events, count):
    batch = [event() for _ in range(count)]
    error = await rpc_error(
        events.PublishEvents(event_service_pb2.PublishEventsRequest(events=batch))
    )
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "events" in error.violations


async def test_publish_1000_events_in_one_call(events):
    batch = [event() for _ in range(1000)]
    response = await events.PublishEvents(event_service_pb2.PublishEventsRequest(events=batch))
    assert len(set(response.ids)) == 1000


async def test_sql_injection_in_payload_is_stored_verbatim(events):
    payload = json.dumps({"q": "'); DROP TABLE events; --", "k": "$1::text"})
    (ident,) = (
        await events.PublishEvents(
            event_service_pb2.PublishEventsRequest(events=[event(json_payload=payload)])
        )
    ).ids
    got = await events.GetEvent(event_service_pb2.GetEventRequest(id=ident))
    assert json.loads(got.json_payload) == json.loads(payload)


async def test_order_changes_appear_in_the_event_feed(orders, events, admin_db):
    from orderstream.orders.v1 import order_pb2, order_service_pb2

    order = await orders.CreateOrder(create_request())
    await orders.UpdateOrderStatus(
        order_service_pb2.UpdateOrderStatusRequest(id=order.id, status=order_pb2.ORDER_STATUS_PAID)
    )
    ids = await admin_db.fetch(
        "SELECT id FROM events WHERE subject = $1 ORDER BY id", f"orders/{order.id}"
    )
    created, changed = [
        await events.GetEvent(event_service_pb2.GetEventRequest(id=r["id"])) for r in ids
    ]
    assert created.type == "order.created"
    assert json.loads(created.json_payload)["order_id"] == order.id
    assert changed.type == "order.status_changed"
    assert json.loads(changed.json_payload) == {
        "order_id": order.id,
        "status": "PAID",
        "previous_status": "PENDING",
        "version": 2,
    }


# --- PublishEvents' request_id ---------------------------------------------------


async def test_a_retried_publish_returns_the_first_ids_and_writes_nothing(events, admin_db):
    subject = unique("retried/")
    request = event_service_pb2.PublishEventsRequest(
        request_id=unique("publish-"), events=[event(subject=subject) for _ in range(3)]
    )
    first = await events.PublishEvents(request)
    again = await events.PublishEvents(request)
    assert list(again.ids) == list(first.ids)
    stored = await admin_db.fetch("SELECT id FROM events WHERE subject = $1 ORDER BY id", subject)
    assert [r["id"] for r in stored] == list(first.ids)


async def test_concurrent_identical_publishes_write_once(events, admin_db):
    subject = unique("concurrent/")
    request = event_service_pb2.PublishEventsRequest(
        request_id=unique("publish-"), events=[event(subject=subject), event(subject=subject)]
    )
    answers = await asyncio.gather(*(events.PublishEvents(request) for _ in range(6)))
    assert len({tuple(a.ids) for a in answers}) == 1
    assert await admin_db.fetchval("SELECT count(*) FROM events WHERE subject = $1", subject) == 2


async def test_a_publish_request_id_with_another_body_is_already_exists(events, admin_db):
    key = unique("publish-")
    subject = unique("reused/")
    await events.PublishEvents(
        event_service_pb2.PublishEventsRequest(request_id=key, events=[event(subject=subject)])
    )
    before = await table_counts(admin_db)
    error = await rpc_error(
        events.PublishEvents(
            event_service_pb2.PublishEventsRequest(
                request_id=key, events=[event(subject=subject, json_payload='{"n": 2}')]
            )
        )
    )
    assert error.code == grpc.StatusCode.ALREADY_EXISTS
    assert error.error_info.reason == "REQUEST_ID_REUSED"
    assert await table_counts(admin_db) == before


async def test_publishes_without_request_id_each_write(events, admin_db):
    subject = unique("unkeyed/")
    request = event_service_pb2.PublishEventsRequest(events=[event(subject=subject)])
    first, second = [await events.PublishEvents(request) for _ in range(2)]
    assert first.ids != second.ids
    assert await admin_db.fetchval("SELECT count(*) FROM events WHERE subject = $1", subject) == 2


@pytest.mark.parametrize("key", ["x" * 129, "nul\x00"], ids=["too-long", "nul"])
async def test_a_bad_publish_request_id_is_invalid_argument(events, admin_db, key):
    before = await table_counts(admin_db)
    error = await rpc_error(
        events.PublishEvents(
            event_service_pb2.PublishEventsRequest(request_id=key, events=[event()])
        )
    )
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "request_id" in error.violations
    assert await table_counts(admin_db) == before
