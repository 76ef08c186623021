"""Behind PgBouncer in transaction mode: what the second run of the modules
marked `through_pgbouncer` does not show by itself. The settings that make
the service safe there, verified TLS on both sides of PgBouncer, that its
pooled connections really go through PgBouncer while LISTEN and migrations
do not, and that cursor streams cope with prepared statements other
processes leave on PgBouncer's server connections, leaving none of their
own."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import ssl
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import asyncpg
import asyncpg.connection
import pytest

from devcluster.cluster import Cluster, make_ca_only
from devcluster.process import process_env, service_process
from orderstream.events.v1 import event_service_pb2
from orderstream.orders.v1 import order_service_pb2
from service.app import App
from service.db.pool import connect_direct
from service.errors import StartupError
from service.settings import Settings, SettingsError
from tests.support.calls import export_all, publish, read_all
from tests.support.pgbouncer import POOL_SIZE, PgBouncer, start_pgbouncer, stop_pgbouncer
from tests.support.polling import eventually
from tests.support.requests import create_request, unique

# These tests need the service behind PgBouncer, so they run only there.
through_pgbouncer = pytest.mark.parametrize("database_route", ["pgbouncer"], indirect=True)

BASE_ENV = {"DATABASE_URL": "postgresql://app:secret@bouncer.example:6432/shop"}


def test_transaction_pooling_turns_the_statement_cache_off():
    settings = Settings.from_env(
        {
            **BASE_ENV,
            "ORDERSTREAM_TRANSACTION_POOLING": "1",
            "ORDERSTREAM_DIRECT_DATABASE_URL": (
                "postgresql://app:secret@db.example:5432/shop?sslrootcert=/etc/db-ca.crt"
            ),
            "PGSSLROOTCERT": "/etc/bouncer-ca.crt",
        }
    )
    assert settings.transaction_pooling
    assert settings.statement_cache_size == 0
    # Each URL keeps its own server and TLS settings; PGSSL* fill in the rest.
    assert (settings.database.host, settings.database.port) == ("bouncer.example", 6432)
    assert settings.database.ssl_root_cert == Path("/etc/bouncer-ca.crt")
    direct = settings.direct_database
    assert (direct.host, direct.port, direct.ssl_mode) == ("db.example", 5432, "verify-full")
    assert direct.ssl_root_cert == Path("/etc/db-ca.crt")
    assert "secret" not in repr(settings)


def test_the_direct_url_defaults_to_database_url():
    settings = Settings.from_env(BASE_ENV)
    assert settings.direct_database == settings.database
    assert settings.statement_cache_size == 100
    assert not settings.transaction_pooling


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({}, "ORDERSTREAM_TRANSACTION_POOLING=1 needs ORDERSTREAM_DIRECT_DATABASE_URL"),
        (
            {
                "ORDERSTREAM_DIRECT_DATABASE_URL": "postgresql://app:secret@db.example/shop",
                "ORDERSTREAM_STATEMENT_CACHE_SIZE": "100",
            },
            "ORDERSTREAM_STATEMENT_CACHE_SIZE must be 0",
        ),
        (
            {"ORDERSTREAM_DIRECT_DATABASE_URL": "mysql://app:secret@db.example/shop"},
            "ORDERSTREAM_DIRECT_DATABASE_URL must start with postgresql://",
        ),
        (
            {"ORDERSTREAM_DIRECT_DATABASE_URL": "postgresql://db.example/shop?sslmode=prefer"},
            "sslmode=prefer",
        ),
    ],
    ids=["no-direct-url", "statement-cache-on", "direct-url-not-postgresql", "direct-url-prefer"],
)
def test_unsafe_transaction_pooling_settings_are_refused(overrides, message):
    env = {**BASE_ENV, "ORDERSTREAM_TRANSACTION_POOLING": "1", **overrides}
    with pytest.raises(SettingsError, match=message):
        Settings.from_env(env)


async def test_an_unverifiable_direct_url_stops_startup(
    service_env, pg_cluster: Cluster, tmp_path: Path
):
    """The direct URL is verified like DATABASE_URL, with its own CA, and a
    failure names the server it could not verify."""
    wrong_ca = make_ca_only(tmp_path, "not the cluster's CA")
    env = {
        **service_env,
        "ORDERSTREAM_DIRECT_DATABASE_URL": f"{pg_cluster.dsn()}?sslrootcert={wrong_ca}",
    }
    with pytest.raises(StartupError, match="cannot verify the database server's certificate at"):
        await App.start(Settings.from_env(env))


@through_pgbouncer
async def test_pooled_connections_go_through_pgbouncer_and_the_direct_one_does_not(app: App):
    """PgBouncer hands its clients a cancel key of its own, so only a direct
    connection sees the pid of the backend that runs its statements."""
    async with app.pool.acquire() as pooled:
        assert pooled.get_server_pid() != await pooled.fetchval("SELECT pg_backend_pid()")
    direct = await connect_direct(app.settings)
    try:
        assert direct.get_server_pid() == await direct.fetchval("SELECT pg_backend_pid()")
    finally:
        await direct.close()


@through_pgbouncer
async def test_migrate_needs_only_the_direct_url(service_env):
    """`python -m service migrate` takes its session-level advisory lock on
    the direct connection: it succeeds with DATABASE_URL pointing nowhere."""
    env = process_env(
        service_env, DATABASE_URL="postgresql://nobody:nothing@127.0.0.1:1/orderstream"
    )
    async with service_process(env, "migrate") as child:
        assert await child.exit_code() == 0, child.output
        assert (await child.record("migrations done"))["applied"] == []


@contextlib.asynccontextmanager
async def pgbouncer_sessions(
    bouncer: PgBouncer, count: int
) -> AsyncIterator[list[asyncpg.Connection]]:
    context = ssl.create_default_context(cafile=str(bouncer.ca_cert))
    sessions = [
        await asyncpg.connect(bouncer.dsn(), ssl=context, statement_cache_size=0)
        for _ in range(count)
    ]
    try:
        yield sessions
    finally:
        for session in sessions:
            await session.close()


async def on_every_server_connection(bouncer: PgBouncer, query: str) -> list[list[asyncpg.Record]]:
    """`query`'s rows on each of PgBouncer's server connections: POOL_SIZE
    sessions all in a transaction at once hold one each."""
    async with pgbouncer_sessions(bouncer, POOL_SIZE) as sessions:
        for session in sessions:
            await session.execute("BEGIN")
        found = [await session.fetch(query) for session in sessions]
        for session in sessions:
            await session.execute("COMMIT")
    return found


async def test_pgbouncer_reaches_the_cluster_over_tls_only(pgbouncer: PgBouncer):
    """Every server connection of PgBouncer's pool is encrypted (the cluster
    accepts nothing else; PgBouncer verifies it, see the next test)."""
    found = await on_every_server_connection(
        pgbouncer, "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
    )
    assert [row["ssl"] for rows in found for row in rows] == [True] * POOL_SIZE


async def test_pgbouncer_refuses_a_cluster_it_cannot_verify(pg_cluster: Cluster, tmp_path: Path):
    """server_tls_sslmode=verify-full: with another CA than the cluster's,
    PgBouncer's handshake with the cluster fails and no query gets through."""
    directory = Path(tempfile.mkdtemp(prefix="orderstream-pgbouncer-"))
    wrong_ca = make_ca_only(tmp_path, "not the cluster's CA")
    bouncer = start_pgbouncer(directory, pg_cluster, server_ca=wrong_ca, wait=False)
    try:
        context = ssl.create_default_context(cafile=str(bouncer.ca_cert))

        async def query() -> object:
            conn = await asyncpg.connect(bouncer.dsn(), ssl=context, statement_cache_size=0)
            try:
                return await conn.fetchval("SELECT 1")
            finally:
                await conn.close()

        def logged(text: str) -> Callable[[], Awaitable[bool]]:
            async def check() -> bool:
                return text in bouncer.log_tail()

            return check

        await eventually(logged("listening on"), timeout=30, what="PgBouncer to listen")
        # PgBouncer keeps the client waiting and retries the server login.
        client = asyncio.ensure_future(query())
        try:
            await eventually(
                logged("certificate verify failed"),
                timeout=30,
                what="PgBouncer to refuse the cluster's certificate",
            )
            assert not client.done()
        finally:
            client.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await client
    finally:
        stop_pgbouncer(bouncer)
        shutil.rmtree(directory, ignore_errors=True)


async def test_pgbouncer_refuses_clients_without_tls(pgbouncer: PgBouncer):
    with pytest.raises(asyncpg.ProtocolViolationError, match="SSL required"):
        await asyncpg.connect(pgbouncer.dsn(), ssl=False)


@through_pgbouncer
async def test_the_service_verifies_pgbouncer(service_env, tmp_path: Path):
    """DATABASE_URL (PgBouncer) is verified with its own CA, PGSSLROOTCERT:
    a certificate from another CA stops startup."""
    wrong_ca = make_ca_only(tmp_path, "not PgBouncer's CA")
    with pytest.raises(StartupError, match="cannot verify the database server's certificate at"):
        await App.start(Settings.from_env({**service_env, "PGSSLROOTCERT": str(wrong_ca)}))


@through_pgbouncer
async def test_streams_cope_with_statements_another_process_left_behind(
    pgbouncer: PgBouncer, orders, events
):
    """asyncpg names its prepared statements from a per-process counter that
    starts at 1 in every process, and `conn.cursor` prepares a named one
    even with the statement cache off. Another replica behind the same
    PgBouncer could leave such statements on the server connections it used;
    here the test plays that replica, leaving the names this process would
    use next on every server connection of PgBouncer's pool. The streams
    must still work, and neither leave statements of their own behind (for
    other clients to trip over) nor drop the other clients' ones."""
    customer, subject = unique("cust"), unique("leftovers/")
    created = [await orders.CreateOrder(create_request(customer_id=customer)) for _ in range(3)]
    published = await publish(events, subject, 3)
    # The only way to know those names is asyncpg's own counter.
    counter: int = asyncpg.connection._uid  # type: ignore[attr-defined]
    planted = {f"__asyncpg_stmt_{number:x}__" for number in range(counter + 1, counter + 21)}
    async with pgbouncer_sessions(pgbouncer, POOL_SIZE) as sessions:
        # All open in a transaction at once: each holds its own server connection.
        for session in sessions:
            await session.execute("BEGIN")
        for session in sessions:
            await session.execute("DEALLOCATE ALL")  # what earlier tests left
            for name in planted:
                await session.execute(f"PREPARE {name} AS SELECT 1")
            await session.execute("COMMIT")

    exported, _ = await export_all(
        orders, order_service_pb2.ExportOrdersRequest(customer_id=customer)
    )
    assert exported == created
    streamed, _ = await read_all(
        events.StreamEvents(event_service_pb2.StreamEventsRequest(subject=subject))
    )
    assert [e.id for e in streamed] == published
    left = await on_every_server_connection(pgbouncer, "SELECT name FROM pg_prepared_statements")
    assert [{row["name"] for row in rows} for rows in left] == [planted] * POOL_SIZE
