"""orderstream.client against the real service: the channel factory's
defaults, batched idempotent uploads, and event streams that survive a
dropped connection (cut by a TCP proxy between client and server)."""

from __future__ import annotations

import asyncio
import contextlib
import json

import grpc
import pytest

from orderstream.client import (
    consume_events,
    create_channel,
    create_order,
    publish_events,
    stream_events,
    update_order_status,
    upload_events,
    upload_requests,
)
from orderstream.events.v1 import event_pb2, event_service_pb2
from orderstream.orders.v1 import order_pb2, order_service_pb2, order_service_pb2_grpc
from tests.support.polling import eventually
from tests.support.requests import create_request, unique
from tests.support.tcp_proxy import TcpProxy


def new_event(subject: str, n: int, padding: int = 0) -> event_pb2.Event:
    payload = {"n": n, "padding": "x" * padding}
    return event_pb2.Event(
        type="test.client", source=subject, subject=subject, json_payload=json.dumps(payload)
    )


async def publish(events, subject: str, count: int) -> list[int]:
    batch = [new_event(subject, n) for n in range(count)]
    response = await events.PublishEvents(event_service_pb2.PublishEventsRequest(events=batch))
    return list(response.ids)


async def stored_ns(admin_db, source: str) -> list[int]:
    rows = await admin_db.fetch(
        "SELECT (payload->>'n')::int AS n FROM events WHERE source = $1 ORDER BY id", source
    )
    return [row["n"] for row in rows]


@contextlib.asynccontextmanager
async def proxied_channel(app):
    async with (
        TcpProxy(app.port) as proxy,
        create_channel(f"127.0.0.1:{proxy.port}", insecure=True) as channel,
    ):
        yield proxy, channel


async def test_default_service_config_is_accepted_by_a_real_call(app):
    async with create_channel(f"127.0.0.1:{app.port}", insecure=True) as channel:
        stub = order_service_pb2_grpc.OrderServiceStub(channel)
        created = await stub.CreateOrder(create_request())
        fetched = await stub.GetOrder(order_service_pb2.GetOrderRequest(id=created.id))
    assert fetched == created


def test_certificates_without_tls_are_refused():
    with pytest.raises(ValueError, match="insecure=True takes no certificates"):
        create_channel("localhost:1", insecure=True, ca_file="ca.crt")
    with pytest.raises(ValueError, match="go together"):
        create_channel("localhost:1", client_cert_file="client.crt")


async def test_upload_requests_stay_under_the_byte_budget():
    budget = 4096
    events = [new_event("batching", n, padding=n * 7) for n in range(300)]
    requests = [r async for r in upload_requests(events, "batching-1", max_bytes=budget)]
    assert len(requests) > 10
    assert all(r.ByteSize() <= budget for r in requests)
    assert [r.upload_id for r in requests] == ["batching-1"] + [""] * (len(requests) - 1)
    assert [e for r in requests for e in r.events] == events


async def test_an_event_larger_than_the_budget_travels_alone():
    big, small = new_event("big", 0, padding=5000), new_event("big", 1)
    requests = [r async for r in upload_requests([small, big, small], "big-1", max_bytes=1024)]
    assert [list(r.events) for r in requests] == [[small], [big], [small]]


async def test_upload_of_nothing_still_sends_the_upload_id():
    requests = [r async for r in upload_requests([], "empty-1")]
    assert requests == [event_service_pb2.UploadEventsRequest(upload_id="empty-1")]


async def test_upload_events_from_an_async_iterable_in_many_messages(events, admin_db):
    source = unique("client-upload/")

    async def generate():
        for n in range(500):
            yield new_event(source, n, padding=100)

    response = await upload_events(events, generate(), max_bytes=8192)
    assert response.event_count == 500
    assert response.last_event_id - response.first_event_id >= 499
    assert await stored_ns(admin_db, source) == list(range(500))


async def test_upload_repeated_with_the_same_id_writes_once(channel, admin_db):
    source = unique("client-upload/")
    batch = [new_event(source, n) for n in range(20)]
    first = await upload_events(channel, batch, upload_id=source)
    again = await upload_events(channel, batch, upload_id=source)
    assert again == first
    assert await stored_ns(admin_db, source) == list(range(20))


async def test_upload_cut_midway_is_retried_and_written_once(app, admin_db):
    source = unique("client-upload/")
    async with proxied_channel(app) as (proxy, channel):

        async def generate():
            for n in range(400):
                if n == 200:
                    proxy.cut()
                yield new_event(source, n, padding=200)

        response = await upload_events(channel, generate(), max_bytes=4096)
    assert proxy.connections >= 2
    assert response.event_count == 400
    assert await stored_ns(admin_db, source) == list(range(400))


async def test_upload_gives_up_on_errors_that_a_retry_cannot_fix(events, admin_db):
    source = unique("client-upload/")
    bad = event_pb2.Event(type="", source=source, json_payload="{}")
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await upload_events(events, [new_event(source, 0), bad])
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert await stored_ns(admin_db, source) == []


async def test_stream_events_yields_history_one_by_one(events):
    subject = unique("client-stream/")
    ids = await publish(events, subject, 40)
    received = [event async for event in stream_events(events, subject=subject, after_id=ids[4])]
    assert [e.id for e in received] == ids[5:]
    assert [json.loads(e.json_payload)["n"] for e in received] == list(range(5, 40))


async def test_stream_events_resumes_after_a_dropped_connection(app, events):
    subject = unique("client-stream/")
    published = await publish(events, subject, 50)
    received: list[int] = []
    async with proxied_channel(app) as (proxy, channel):
        stream = stream_events(channel, subject=subject, follow=True)
        async with contextlib.aclosing(stream):
            async for event in stream:
                received.append(event.id)
                if len(received) == 10:
                    proxy.cut()
                    # Written while the client is cut off: the resumed
                    # stream must pick them up exactly once.
                    published += await publish(events, subject, 25)
                if len(received) == len(published):
                    break
    assert received == published
    assert proxy.connections >= 2


async def test_consume_events_resumes_after_what_it_acknowledged(events):
    """Every `ack_every` events the last processed one is acknowledged: a
    consumer that stops after 7 of 12 events (5 acknowledged) gets the 6th
    on; one that reaches the live end is acknowledged that far."""
    consumer, subject = unique("client-consumer"), unique("client-stream/")
    ids = await publish(events, subject, 12)
    received: list[int] = []

    async def consume(count: int | None) -> None:
        stream = consume_events(events, consumer, subject=subject, ack_every=5)
        async with contextlib.aclosing(stream):
            async for event in stream:
                received.append(event.id)
                if len(received) == count:
                    return

    async def position() -> int:
        request = event_service_pb2.GetConsumerRequest(name=consumer)
        return (await events.GetConsumer(request)).position

    await consume(7)
    assert received == ids[:7]
    assert await position() == ids[4]
    received.clear()
    following = asyncio.create_task(consume(None))
    try:

        async def at_the_end() -> bool:
            return await position() == ids[-1]

        await eventually(at_the_end, what="the live end to be acknowledged")
    finally:
        following.cancel()
    assert received == ids[5:]


async def test_stream_events_raises_what_a_reconnect_cannot_fix(events):
    stream = stream_events(events, types=["t"] * 101)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async with contextlib.aclosing(stream):
            async for _ in stream:
                pass
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_publish_events_with_the_same_request_id_writes_once(app, admin_db):
    subject = unique("client-publish/")
    key = unique("client-publish-")
    batch = [new_event(subject, n) for n in range(3)]
    async with create_channel(f"127.0.0.1:{app.port}", insecure=True) as channel:
        first = await publish_events(channel, batch, request_id=key)
        again = await publish_events(channel, batch, request_id=key)
        fresh = await publish_events(channel, batch)
    assert again == first
    assert set(fresh).isdisjoint(first)
    assert await stored_ns(admin_db, subject) == [0, 1, 2, 0, 1, 2]


async def test_write_helpers_set_request_ids(app, admin_db):
    async with create_channel(f"127.0.0.1:{app.port}", insecure=True) as channel:
        order = await create_order(channel, create_request(request_id=""))
        paid = await update_order_status(channel, order.id, order_pb2.ORDER_STATUS_PAID)
    assert await admin_db.fetchval("SELECT request_id FROM orders WHERE id = $1", order.id)
    assert (
        await admin_db.fetchval(
            "SELECT count(*) FROM status_requests WHERE order_id = $1", order.id
        )
        == 1
    )
    assert paid.status == order_pb2.ORDER_STATUS_PAID
