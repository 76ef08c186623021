"""Retention on a database of its own: expired events go while a follower
streams, with no gap; a position retention deleted past is OUT_OF_RANGE
naming the earliest retained event; a slow consumer can hold retention
back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from devcluster.cluster import Cluster
from orderstream.events.v1 import event_pb2, event_service_pb2, event_service_pb2_grpc
from service.app import App
from service.events.retention import Retention
from tests.support.apps import app_with_channel
from tests.support.calls import read_all
from tests.support.requests import unique
from tests.support.status import rpc_error

Request = event_service_pb2.StreamEventsRequest
KEEP = 3600.0


@pytest.fixture
async def isolated(
    service_env: dict[str, str], pg_cluster: Cluster, fresh_database: str
) -> AsyncIterator[tuple[App, event_service_pb2_grpc.EventServiceStub]]:
    """A service on a database of its own: retention deletes the oldest
    events of the whole feed, which other tests' events must not be."""
    url = pg_cluster.dsn(database=fresh_database)
    async with app_with_channel(service_env, DATABASE_URL=url) as (app, channel):
        yield app, event_service_pb2_grpc.EventServiceStub(channel)


async def publish(stub, subject: str, count: int, *, age: float = 0.0) -> list[int]:
    """`count` events whose `time` lies `age` seconds back."""
    written = Timestamp()
    written.FromNanoseconds(int((time.time() - age) * 1e9))
    batch = [
        event_pb2.Event(
            type="test.retained", source="/tests", subject=subject, time=written, json_payload="{}"
        )
        for _ in range(count)
    ]
    response = await stub.PublishEvents(event_service_pb2.PublishEventsRequest(events=batch))
    return list(response.ids)


async def test_retention_deletes_while_a_follower_streams_without_a_gap(isolated):
    app, stub = isolated
    subject = unique("retained/")
    old: list[int] = []
    for _ in range(3):
        old += await publish(stub, subject, 1000, age=2 * KEEP)
    retention = Retention(app.pool, keep=KEEP, hold_for_consumers=False, batch_rows=700)
    assert await retention.run_once() == 0  # the first round only notes the horizon

    follower = stub.StreamEvents(Request(after_id=old[-1], follow=True), timeout=60)
    written: list[int] = []

    async def write() -> None:
        for _ in range(40):
            written.extend(await publish(stub, subject, 50))

    writer = asyncio.create_task(write())
    deleted = await retention.run_once()
    await writer
    received: list[int] = []
    try:
        async for message in follower:
            received.extend(e.id for e in message.events)
            if len(received) >= len(written):
                break
    finally:
        follower.cancel()
    assert deleted == 3000
    assert received == written

    # From the start is from the earliest retained event.
    everything, _ = await read_all(stub.StreamEvents(Request(subject=subject)))
    assert [e.id for e in everything] == written

    error = await rpc_error(read_all(stub.StreamEvents(Request(after_id=old[10]))))
    assert error.code == grpc.StatusCode.OUT_OF_RANGE
    assert error.error_info is not None and error.error_info.reason == "EVENTS_EXPIRED"
    assert error.error_info.metadata["first_id"] == str(written[0])
    assert error.error_info.metadata["resume_after"] == str(old[-1])


async def test_slow_consumers_hold_retention_back_when_told_to(isolated):
    app, stub = isolated
    subject = unique("retained/")
    old = await publish(stub, subject, 1000, age=2 * KEEP)
    slowest, slower = unique("slowest"), unique("slower")
    for consumer in (slowest, slower):
        await read_all(stub.StreamEvents(Request(consumer=consumer, subject=subject)))
    ack = event_service_pb2.AckEventsRequest
    await stub.AckEvents(ack(consumer=slowest, position=old[99]))
    await stub.AckEvents(ack(consumer=slower, position=old[499]))

    held = Retention(app.pool, keep=KEEP, hold_for_consumers=True)
    await held.run_once()
    assert await held.run_once() == 100  # up to the slowest consumer, no further
    received, _ = await read_all(stub.StreamEvents(Request(consumer=slowest, subject=subject)))
    assert [e.id for e in received] == old[100:]
    await stub.AckEvents(ack(consumer=slowest, position=old[-1]))
    assert await held.run_once() == 400
    received, _ = await read_all(stub.StreamEvents(Request(consumer=slower, subject=subject)))
    assert [e.id for e in received] == old[500:]

    # Without the hold, a consumer's events go all the same, and it is told.
    unheld = Retention(app.pool, keep=KEEP, hold_for_consumers=False)
    await unheld.run_once()
    assert await unheld.run_once() == 500
    error = await rpc_error(read_all(stub.StreamEvents(Request(consumer=slower))))
    assert error.code == grpc.StatusCode.OUT_OF_RANGE
    assert error.error_info is not None
    assert error.error_info.metadata["resume_after"] == str(old[-1])
    assert error.error_info.metadata["position"] == str(old[499])
