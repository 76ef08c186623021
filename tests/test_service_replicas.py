"""Several real `python -m service` processes on one fresh database, started
together as Kubernetes starts replicas: migrations apply once, idempotency
keys hold across processes, and followers on every process see every event
exactly once whichever process wrote it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import grpc
import pytest

from devcluster.cluster import Cluster, create_database
from devcluster.process import ServiceProcess, process_env, service_process
from orderstream.events.v1 import event_pb2, event_service_pb2, event_service_pb2_grpc
from orderstream.orders.v1 import order_service_pb2, order_service_pb2_grpc
from service.db.migrate import available_migrations
from tests.support.database import admin_ssl_context
from tests.support.polling import eventually
from tests.support.requests import create_request, order, stream, unique

pytestmark = pytest.mark.slow

PROCESSES = 4
FOLLOWERS = 3
EVENTS = 30
UploadRequest = event_service_pb2.UploadEventsRequest
ImportRequest = order_service_pb2.ImportOrdersRequest


@dataclass
class Replica:
    process: ServiceProcess
    channel: grpc.aio.Channel
    orders: order_service_pb2_grpc.OrderServiceStub
    events: event_service_pb2_grpc.EventServiceStub


@dataclass
class Deployment:
    database: str
    replicas: list[Replica]
    admin: asyncpg.Pool


@pytest.fixture(scope="module")
async def deployment(service_env: dict[str, str], pg_cluster: Cluster) -> AsyncIterator[Deployment]:
    """PROCESSES service processes started at once on a database no
    migration has touched."""
    database = await create_database(pg_cluster, unique("replicas").replace("-", "_"))
    env = process_env(service_env, DATABASE_URL=pg_cluster.dsn(database=database))
    async with contextlib.AsyncExitStack() as stack:
        processes = [
            await stack.enter_async_context(service_process(env, "serve")) for _ in range(PROCESSES)
        ]
        serving = await asyncio.gather(
            *(process.record("serving", timeout=60) for process in processes)
        )
        replicas = []
        for process, line in zip(processes, serving, strict=True):
            channel = await stack.enter_async_context(
                grpc.aio.insecure_channel(f"127.0.0.1:{line['port']}")
            )
            replicas.append(
                Replica(
                    process,
                    channel,
                    order_service_pb2_grpc.OrderServiceStub(channel),
                    event_service_pb2_grpc.EventServiceStub(channel),
                )
            )
        admin = await asyncpg.create_pool(
            pg_cluster.dsn(admin=True, database=database),
            ssl=admin_ssl_context(pg_cluster),
            min_size=1,
            max_size=2,
        )
        stack.push_async_callback(admin.close)
        yield Deployment(database, replicas, admin)


async def test_migrations_from_processes_started_together_apply_once(deployment):
    applied = [
        record["migration"]
        for replica in deployment.replicas
        for record in replica.process.records
        if record.get("message") == "applied migration"
    ]
    names = [migration.name for migration in available_migrations()]
    assert sorted(applied) == sorted(names)
    recorded = await deployment.admin.fetch("SELECT name FROM schema_migrations ORDER BY version")
    assert [row["name"] for row in recorded] == names
    # Every process serves on the schema, whichever of them applied it.
    for replica in deployment.replicas:
        order = await replica.orders.CreateOrder(create_request(), timeout=30)
        assert order.id > 0


async def _waiting_on_lock(admin: asyncpg.Pool, fragment: str, count: int) -> bool:
    waiting = await admin.fetchval(
        """
        SELECT count(*) FROM pg_stat_activity
        WHERE application_name = 'orderstream' AND wait_event_type = 'Lock'
          AND position($1 IN query) > 0
        """,
        fragment,
    )
    return bool(waiting == count)


async def test_one_request_id_sent_to_two_processes_at_once_creates_one_order(deployment):
    """A table lock holds both inserts until both processes are waiting on
    it, so the two calls really race."""
    first, second = deployment.replicas[:2]
    request = create_request()
    async with deployment.admin.acquire() as conn:
        async with conn.transaction():
            await conn.execute("LOCK TABLE orders IN SHARE MODE")
            calls = [
                asyncio.ensure_future(replica.orders.CreateOrder(request, timeout=60))
                for replica in (first, second)
            ]

            async def both_waiting() -> bool:
                return await _waiting_on_lock(deployment.admin, "orders_create_batch(", 2)

            await eventually(both_waiting, timeout=30, what="both inserts to wait on the lock")
        one, other = await asyncio.gather(*calls)
    assert one == other
    stored = await deployment.admin.fetchval(
        "SELECT count(*) FROM orders WHERE request_id = $1", request.request_id
    )
    assert stored == 1


def _event(source: str, subject: str = "things/1") -> event_pb2.Event:
    return event_pb2.Event(
        type="com.example.replicated", source=source, subject=subject, json_payload='{"n": 1}'
    )


async def test_one_upload_id_sent_to_two_processes_at_once_loads_once(deployment):
    """The second upload waits for the first one's claim and is told the
    same id range (the upload_id contract in uploads.py and docs/streams.md)."""
    first, second = deployment.replicas[:2]
    upload_id = unique("upload")
    source_a, source_b = unique("/replicas-a"), unique("/replicas-b")
    call_a = first.events.UploadEvents(timeout=60)
    await call_a.write(UploadRequest(upload_id=upload_id, events=[_event(source_a)] * 50))

    async def copying() -> bool:
        return bool(await deployment.admin.fetchval("SELECT count(*) FROM pg_stat_progress_copy"))

    await eventually(copying, timeout=30, what="the first upload to start its COPY")
    call_b = second.events.UploadEvents(
        stream([UploadRequest(upload_id=upload_id, events=[_event(source_b)] * 30)]), timeout=60
    )

    async def second_waiting() -> bool:
        return await _waiting_on_lock(deployment.admin, "INSERT INTO uploads", 1)

    await eventually(second_waiting, timeout=30, what="the second upload to wait for the claim")
    await call_a.write(UploadRequest(events=[_event(source_a)] * 50))
    await call_a.done_writing()
    response_a, response_b = await call_a, await call_b

    assert response_a.event_count == 100
    assert response_b == response_a
    rows = await deployment.admin.fetch(
        "SELECT source, count(*) AS n FROM events WHERE source = ANY($1::text[]) GROUP BY source",
        [source_a, source_b],
    )
    assert {row["source"]: row["n"] for row in rows} == {source_a: 100}


async def test_one_import_id_sent_to_two_processes_at_once_imports_once(deployment):
    """As for upload_id: the second import waits for the first one's claim
    and is told the same id range."""
    first, second = deployment.replicas[:2]
    import_id = unique("import")
    customer_a, customer_b = unique("cust-a"), unique("cust-b")
    call_a = first.orders.ImportOrders(timeout=60)
    await call_a.write(
        ImportRequest(import_id=import_id, orders=[order(customer_id=customer_a)] * 20)
    )

    async def copying() -> bool:
        return bool(await deployment.admin.fetchval("SELECT count(*) FROM pg_stat_progress_copy"))

    await eventually(copying, timeout=30, what="the first import to start its COPY")
    call_b = second.orders.ImportOrders(
        stream([ImportRequest(import_id=import_id, orders=[order(customer_id=customer_b)] * 7)]),
        timeout=60,
    )

    async def second_waiting() -> bool:
        return await _waiting_on_lock(deployment.admin, "INSERT INTO imports", 1)

    await eventually(second_waiting, timeout=30, what="the second import to wait for the claim")
    await call_a.write(ImportRequest(orders=[order(customer_id=customer_a)] * 20))
    await call_a.done_writing()
    response_a, response_b = await call_a, await call_b

    assert response_a.order_count == 40
    assert response_b == response_a
    rows = await deployment.admin.fetch(
        "SELECT customer_id, count(*) AS n FROM orders WHERE customer_id = ANY($1::text[]) "
        "GROUP BY customer_id",
        [customer_a, customer_b],
    )
    assert {row["customer_id"]: row["n"] for row in rows} == {customer_a: 40}


async def _follow_until(
    events: event_service_pb2_grpc.EventServiceStub, after_id: int, subject: str, last_type: str
) -> list[int]:
    """Ids a follower receives, up to (not including) the first event of `last_type`."""
    request = event_service_pb2.StreamEventsRequest(after_id=after_id, subject=subject, follow=True)
    call = events.StreamEvents(request, timeout=120)
    received = []
    try:
        async for message in call:
            for event in message.events:
                if event.type == last_type:
                    return received
                received.append(event.id)
    finally:
        call.cancel()
    raise AssertionError("the follow stream ended before the last event")


async def test_followers_on_three_processes_see_every_event_once(deployment):
    """Writes go through every process in turn (single publishes and an
    upload); each follower ends at a final marker event, and everything
    before it must be exactly the events written, in order."""
    subject, source = unique("things"), unique("/followed")
    start = await deployment.admin.fetchval("SELECT coalesce(max(id), 0) FROM events")
    followers = [
        asyncio.ensure_future(_follow_until(replica.events, start, subject, "marker.last"))
        for replica in deployment.replicas[:FOLLOWERS]
    ]
    written: list[int] = []
    for n in range(EVENTS):
        writer = deployment.replicas[n % PROCESSES]
        response = await writer.events.PublishEvents(
            event_service_pb2.PublishEventsRequest(events=[_event(source, subject)]), timeout=30
        )
        written.extend(response.ids)
    uploaded = await deployment.replicas[-1].events.UploadEvents(
        stream([UploadRequest(upload_id=unique("upload"), events=[_event(source, subject)] * 5)]),
        timeout=30,
    )
    written.extend(range(uploaded.first_event_id, uploaded.last_event_id + 1))
    marker = event_pb2.Event(type="marker.last", source=source, subject=subject, json_payload="{}")
    await deployment.replicas[1].events.PublishEvents(
        event_service_pb2.PublishEventsRequest(events=[marker]), timeout=30
    )
    async with asyncio.timeout(90):
        seen = await asyncio.gather(*followers)
    assert len(written) == EVENTS + 5
    assert seen == [sorted(written)] * FOLLOWERS
