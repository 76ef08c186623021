"""A read replica: a real hot standby, made with pg_basebackup from a primary
of its own (so pausing replay or stopping the standby disturbs no other
test), streaming over verified TLS. ListOrders and ExportOrders reach it;
writes, read-your-writes reads and event streams never do; a lagging, dead
or stalled replica is bypassed with no error to the caller, and used again
once it is back. One more test records why StreamEvents stays on the
primary."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Iterator

import asyncpg
import grpc
import pytest

from devcluster.cluster import Cluster, start_standby, stop_cluster
from devcluster.throwaway import throwaway_cluster
from orderstream.events.v1 import event_pb2, event_service_pb2, event_service_pb2_grpc
from orderstream.orders.v1 import order_pb2, order_service_pb2, order_service_pb2_grpc
from service.app import App
from service.db.migrate import migrate
from service.db.pool import close_pool, open_replica_pool
from service.errors import StartupError
from service.settings import Settings
from tests.support.apps import running_app
from tests.support.database import ServerLog, admin_ssl_context, multi_host_dsn, through_proxy
from tests.support.polling import eventually
from tests.support.requests import create_request, stream, unique
from tests.support.requests import order as order_to_import
from tests.support.tcp_proxy import TcpProxy

pytestmark = pytest.mark.slow

# Every statement the standby runs is logged with the client's application name.
STANDBY_SETTINGS = {"log_statement": "all", "log_line_prefix": "%m [%p] app=%a "}
LOG_ENTRY_START = re.compile(r"^\d{4}-\d\d-\d\d ", re.MULTILINE)
WRITE_SQL = re.compile(r"\b(INSERT|UPDATE|DELETE|COPY|MERGE|TRUNCATE)\b", re.IGNORECASE)
NEVER = "3600"  # a check interval no test outlives: only calls notice trouble


@pytest.fixture(scope="module")
def primary() -> Iterator[Cluster]:
    with throwaway_cluster("orderstream-primary-", durable=False, stop_mode="immediate") as cluster:
        yield cluster


@pytest.fixture(scope="module")
async def primary_admin(primary: Cluster) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(primary.dsn(), ssl=admin_ssl_context(primary))
    try:
        await migrate(conn)  # as the schema's owner, before the standby is copied
    finally:
        await conn.close()
    conn = await asyncpg.connect(primary.dsn(admin=True), ssl=admin_ssl_context(primary))
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def standby(primary: Cluster, primary_admin: asyncpg.Connection) -> Iterator[Cluster]:
    with throwaway_cluster(
        "orderstream-standby-",
        durable=False,
        stop_mode="immediate",
        standby_of=primary,
        settings=STANDBY_SETTINGS,
    ) as cluster:
        yield cluster


async def _connect(cluster: Cluster) -> asyncpg.Connection:
    return await asyncpg.connect(cluster.dsn(admin=True), ssl=admin_ssl_context(cluster))


@pytest.fixture
async def standby_admin(standby: Cluster) -> AsyncIterator[asyncpg.Connection]:
    """Per test: a test that stops the standby breaks the connection."""
    conn = await _connect(standby)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def replica_env(service_env: dict[str, str], primary: Cluster, standby: Cluster) -> dict[str, str]:
    return {
        **service_env,
        **primary.service_env(),
        "ORDERSTREAM_REPLICA_DATABASE_URL": standby.dsn(),
        "ORDERSTREAM_REPLICA_MAX_LAG": "60",
    }


async def caught_up(primary_admin: asyncpg.Connection, standby: Cluster) -> None:
    """Waits until the standby has replayed everything the primary has written."""
    written = await primary_admin.fetchval("SELECT pg_current_wal_insert_lsn()")
    conn = await _connect(standby)
    try:

        async def replayed() -> bool:
            return bool(
                await conn.fetchval("SELECT pg_last_wal_replay_lsn() >= $1::pg_lsn", written)
            )

        await eventually(replayed, timeout=30, what="the standby to replay the primary's WAL")
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def replay_paused(standby: Cluster) -> AsyncIterator[None]:
    conn = await _connect(standby)
    try:
        await conn.execute("SELECT pg_wal_replay_pause()")

        async def paused() -> bool:
            return await conn.fetchval("SELECT pg_get_wal_replay_pause_state()") == "paused"

        await eventually(paused, what="replay to pause")
        try:
            yield
        finally:
            await conn.execute("SELECT pg_wal_replay_resume()")
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def stubs(app: App) -> AsyncIterator[order_service_pb2_grpc.OrderServiceStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        yield order_service_pb2_grpc.OrderServiceStub(channel)


@contextlib.asynccontextmanager
async def event_stub(app: App) -> AsyncIterator[event_service_pb2_grpc.EventServiceStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        yield event_service_pb2_grpc.EventServiceStub(channel)


async def listed(orders: order_service_pb2_grpc.OrderServiceStub, customer: str) -> list[int]:
    response = await orders.ListOrders(
        order_service_pb2.ListOrdersRequest(customer_id=customer), timeout=30
    )
    return [order.id for order in response.orders]


async def exported(orders: order_service_pb2_grpc.OrderServiceStub, customer: str) -> list[int]:
    request = order_service_pb2.ExportOrdersRequest(customer_id=customer)
    return [
        o.id async for message in orders.ExportOrders(request, timeout=30) for o in message.orders
    ]


async def create(orders: order_service_pb2_grpc.OrderServiceStub, customer: str) -> int:
    order = await orders.CreateOrder(create_request(customer_id=customer), timeout=30)
    return int(order.id)


def routed(app: App, database: str) -> float:
    return sum(
        app.metrics.registry.get_sample_value(
            "orderstream_routed_reads_total", {"method": method, "database": database}
        )
        or 0.0
        for method in ("ListOrders", "ExportOrders")
    )


async def test_the_standby_streams_over_verified_tls(primary_admin, standby_admin, standby):
    conninfo = await standby_admin.fetchval("SHOW primary_conninfo")
    # pg_basebackup writes the values quoted: sslmode='verify-full'.
    assert re.search(r"\bsslmode='?verify-full\b", conninfo), conninfo
    assert re.search(r"\bsslrootcert='?/", conninfo), conninfo
    assert "password" not in conninfo.replace("passfile", "")
    ssl_in_use = await primary_admin.fetchval(
        "SELECT s.ssl FROM pg_stat_replication r JOIN pg_stat_ssl s USING (pid) "
        "WHERE r.application_name = $1",
        standby.base_dir.name,
    )
    assert ssl_in_use is True


async def test_lists_and_exports_are_served_by_the_replica(replica_env, primary_admin, standby):
    """With replay paused, an order committed on the primary is missing from
    both reads: they came from the standby."""
    customer = unique("cust")
    async with running_app(replica_env) as app, stubs(app) as orders:
        before = await create(orders, customer)
        await caught_up(primary_admin, standby)
        async with replay_paused(standby):
            after = await create(orders, customer)
            assert await listed(orders, customer) == [before]
            assert await exported(orders, customer) == [before]
        assert app.replica is not None and app.replica.usable
    assert after > before


async def test_get_order_reads_the_primary(replica_env, primary_admin, standby):
    """Read-your-writes: an order just created is found even while the
    standby cannot have it yet."""
    customer = unique("cust")
    async with running_app(replica_env) as app, stubs(app) as orders:
        await caught_up(primary_admin, standby)
        async with replay_paused(standby):
            created = await orders.CreateOrder(create_request(customer_id=customer), timeout=30)
            fetched = await orders.GetOrder(
                order_service_pb2.GetOrderRequest(id=created.id), timeout=30
            )
            assert await listed(orders, customer) == []
    assert fetched == created


async def test_event_reads_stay_on_the_primary(replica_env, primary_admin, standby):
    """GetEvent (read-your-writes) and StreamEvents history (the safe horizon
    is right only on the primary) find an event the standby cannot have yet,
    while the replica is in use."""
    subject = unique("replica/")
    event = event_pb2.Event(type="t", source=unique("/replica"), subject=subject, json_payload="{}")
    async with running_app(replica_env) as app, event_stub(app) as events:
        await caught_up(primary_admin, standby)
        async with replay_paused(standby):
            published = await events.PublishEvents(
                event_service_pb2.PublishEventsRequest(events=[event]), timeout=30
            )
            fetched = await events.GetEvent(
                event_service_pb2.GetEventRequest(id=published.ids[0]), timeout=30
            )
            request = event_service_pb2.StreamEventsRequest(subject=subject)
            streamed = [
                e.id
                async for message in events.StreamEvents(request, timeout=30)
                for e in message.events
            ]
            assert app.replica is not None and app.replica.usable
    assert fetched.id == published.ids[0]
    assert streamed == list(published.ids)


async def test_writes_never_reach_the_replica(replica_env, standby):
    """The standby logs every statement it runs: the service's reads are
    there, its writes are not."""
    log = ServerLog(standby)
    customer = unique("cust")
    async with running_app(replica_env) as app, stubs(app) as orders, event_stub(app) as events:
        order = await orders.CreateOrder(create_request(customer_id=customer), timeout=30)
        await orders.UpdateOrderStatus(
            order_service_pb2.UpdateOrderStatusRequest(
                id=order.id, status=order_pb2.ORDER_STATUS_PAID
            ),
            timeout=30,
        )
        event = event_pb2.Event(type="t", source=unique("/replica"), json_payload="{}")
        await events.PublishEvents(
            event_service_pb2.PublishEventsRequest(events=[event]), timeout=30
        )
        await events.UploadEvents(
            stream([event_service_pb2.UploadEventsRequest(upload_id=unique("up"), events=[event])]),
            timeout=30,
        )
        await orders.ImportOrders(
            stream(
                [
                    order_service_pb2.ImportOrdersRequest(
                        import_id=unique("import"), orders=[order_to_import(customer_id=customer)]
                    )
                ]
            ),
            timeout=30,
        )
        await listed(orders, customer)
    text = log.new_text()
    # An entry runs until the next timestamp: the SQL texts span lines.
    starts = [m.start() for m in LOG_ENTRY_START.finditer(text)]
    entries = [text[a:b] for a, b in zip(starts, [*starts[1:], len(text)], strict=True)]
    service_statements = [e for e in entries if "app=orderstream " in e and "LOG:  " in e]
    assert any("FROM orders" in e for e in service_statements), text
    assert [e for e in service_statements if WRITE_SQL.search(e)] == []


async def test_a_lagging_replica_is_bypassed(replica_env, primary_admin, standby):
    customer = unique("cust")
    async with (
        running_app(
            replica_env,
            ORDERSTREAM_REPLICA_MAX_LAG="1",
            ORDERSTREAM_REPLICA_CHECK_INTERVAL="0.1",
        ) as app,
        stubs(app) as orders,
    ):
        monitor = app.replica
        assert monitor is not None
        await caught_up(primary_admin, standby)
        async with replay_paused(standby):
            fresh = await create(orders, customer)

            async def lagging() -> bool:
                return not monitor.usable

            await eventually(lagging, what="the monitor to notice the lag")
            served_by_primary = routed(app, "primary")
            assert await listed(orders, customer) == [fresh]
            assert await exported(orders, customer) == [fresh]
            assert routed(app, "primary") == served_by_primary + 2
            assert monitor.lag is not None and monitor.lag > 1


async def test_a_replica_that_caught_up_is_used_again(replica_env, primary_admin, standby):
    async with (
        running_app(
            replica_env, ORDERSTREAM_REPLICA_MAX_LAG="1", ORDERSTREAM_REPLICA_CHECK_INTERVAL="0.1"
        ) as app,
        stubs(app) as orders,
    ):
        monitor = app.replica
        assert monitor is not None
        async with replay_paused(standby):
            await primary_admin.execute("SELECT pg_logical_emit_message(false, 'test', 'x')")

            async def lagging() -> bool:
                return not monitor.usable

            await eventually(lagging, what="the monitor to notice the lag")

        async def usable() -> bool:
            return monitor.usable

        await eventually(usable, what="the monitor to see the replica caught up")
        served_by_replica = routed(app, "replica")
        await listed(orders, unique("cust"))
        assert routed(app, "replica") == served_by_replica + 1


async def test_a_dead_replica_is_bypassed_without_error(replica_env, primary, standby):
    """Only the calls can notice here (the check interval is an hour): the
    first read finds the standby gone, is served by the primary, and marks
    it down for the reads after it."""
    customer = unique("cust")
    async with (
        running_app(replica_env, ORDERSTREAM_REPLICA_CHECK_INTERVAL=NEVER) as app,
        stubs(app) as orders,
    ):
        monitor = app.replica
        assert monitor is not None and monitor.usable
        assert await listed(orders, customer) == []  # a pooled replica connection
        assert routed(app, "replica") == 1
        stop_cluster(standby, mode="fast")
        try:
            fresh = await create(orders, customer)
            assert await listed(orders, customer) == [fresh]
            assert not monitor.usable
            assert await exported(orders, customer) == [fresh]
            assert routed(app, "replica") == 1
        finally:
            start_standby(primary, standby.base_dir, durable=False, settings=STANDBY_SETTINGS)


async def test_a_replica_behind_a_stalled_network_is_bypassed_without_error(replica_env, standby):
    """A standby whose host stops answering (bytes dropped, nothing reset),
    with only the calls to notice: the pooled connection's query times out
    and new connections do not open within the acquire timeout, yet every
    read is served by the primary without error."""
    customer = unique("cust")
    async with TcpProxy(standby.port) as proxy:
        proxied = through_proxy(standby, proxy.port).dsn()
        async with (
            running_app(
                replica_env,
                ORDERSTREAM_REPLICA_DATABASE_URL=proxied,
                ORDERSTREAM_REPLICA_CHECK_INTERVAL=NEVER,
                ORDERSTREAM_POOL_ACQUIRE_TIMEOUT="2",
                ORDERSTREAM_COMMAND_TIMEOUT="2",
                ORDERSTREAM_SHUTDOWN_GRACE="2",
            ) as app,
            stubs(app) as orders,
        ):
            monitor = app.replica
            assert monitor is not None and monitor.usable
            assert await listed(orders, customer) == []  # a pooled replica connection
            assert routed(app, "replica") == 1
            proxy.blackhole()
            fresh = await create(orders, customer)
            # At once: one read takes the pooled connection, whose query
            # times out; the others wait for new ones, which never open.
            reads = await asyncio.gather(
                listed(orders, customer), listed(orders, customer), exported(orders, customer)
            )
            assert reads == [[fresh]] * 3
            assert not monitor.usable
            assert routed(app, "replica") == 1


async def test_a_replica_that_comes_back_is_used_again(
    replica_env, primary, primary_admin, standby
):
    customer = unique("cust")
    async with (
        running_app(replica_env, ORDERSTREAM_REPLICA_CHECK_INTERVAL="0.1") as app,
        stubs(app) as orders,
    ):
        monitor = app.replica
        assert monitor is not None and monitor.usable
        stop_cluster(standby, mode="fast")
        try:

            async def down() -> bool:
                return not monitor.usable

            await eventually(down, what="the monitor to notice the standby is gone")
        finally:
            start_standby(primary, standby.base_dir, durable=False, settings=STANDBY_SETTINGS)

        async def up() -> bool:
            return monitor.usable

        await eventually(up, timeout=30, what="the monitor to use the standby again")
        before = await create(orders, customer)
        await caught_up(primary_admin, standby)
        async with replay_paused(standby):
            await create(orders, customer)
            assert await listed(orders, customer) == [before]


async def test_the_safe_horizon_is_not_safe_on_a_standby(primary, primary_admin, standby):
    """Why StreamEvents stays on the primary (service/db/routing.py): an
    event drawn but not yet committed on the primary holds the primary's
    horizon below it, but the standby sees neither the primary's advisory
    locks nor the sequence's exact value, so its horizon passes the event
    while the event is invisible there: a history read on the standby
    would skip it for good."""
    writer = await asyncpg.connect(primary.dsn(), ssl=admin_ssl_context(primary))
    reader = await _connect(standby)
    try:
        async with writer.transaction():
            pending = await writer.fetchval(
                "INSERT INTO events (type, source, time, payload) "
                "VALUES ('t', '/horizon', now(), '{}') RETURNING id"
            )
            assert await primary_admin.fetchval("SELECT events_safe_horizon()") <= pending
            # Another commit flushes the WAL that logged the sequence's advance.
            await primary_admin.execute("SELECT pg_logical_emit_message(true, 'test', 'x')")

            async def standby_horizon_passed() -> bool:
                return await reader.fetchval("SELECT events_safe_horizon()") > pending

            await eventually(standby_horizon_passed, what="the standby's horizon to pass it")
            assert await reader.fetchval("SELECT count(*) FROM events WHERE id = $1", pending) == 0
            raise _RollBack
    except _RollBack:
        pass
    finally:
        await writer.close()
        await reader.close()


class _RollBack(Exception):
    """Leaves the transaction without committing its event."""


async def test_an_unverified_replica_connection_is_refused(replica_env, standby):
    """The replica URL follows DATABASE_URL's TLS rules: verify-full or an
    explicit development opt-in."""
    unverified = standby.dsn() + "?sslmode=require"
    with pytest.raises(StartupError, match="refusing database connection with sslmode=require"):
        await App.start(
            Settings.from_env({**replica_env, "ORDERSTREAM_REPLICA_DATABASE_URL": unverified})
        )


async def test_a_replica_url_listing_every_node_prefers_the_standby(service_env, primary, standby):
    """After a failover the nodes trade places; a replica URL that names
    both (the primary first here) stays on whichever is the standby
    (target_session_attrs=prefer-standby, its default)."""
    url = multi_host_dsn(primary, f"localhost:{primary.port}", f"localhost:{standby.port}")
    settings = Settings.from_env(
        {**service_env, **primary.service_env(), "ORDERSTREAM_REPLICA_DATABASE_URL": url}
    )
    assert settings.replica is not None
    pool = await open_replica_pool(settings, settings.replica)
    try:
        for _ in range(3):
            assert await pool.fetchval("SELECT pg_is_in_recovery()") is True
    finally:
        await close_pool(pool, 5)
