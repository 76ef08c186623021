"""Fixtures that yield real resources: a TLS PostgreSQL cluster started for
the session, the service serving on a free port, channels and stubs.

Modules marked `through_pgbouncer` run twice, `[direct]` and `[pgbouncer]`:
the second time the service (`service_env` and everything built on it)
reaches the cluster through a real PgBouncer in transaction mode
(tests/pgbouncer.py). `admin_db` always looks at the cluster directly.
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2_grpc

from devcluster.cluster import Cluster, start_cluster, stop_cluster
from orderstream.events.v1 import event_service_pb2_grpc
from orderstream.orders.v1 import order_service_pb2_grpc
from service.app import App
from service.settings import Settings
from tests.pgbouncer import PgBouncer, start_pgbouncer, stop_pgbouncer
from tests.support import admin_ssl_context

# The fault suite's and the hostile-input run's figures, in the summary.
pytest_plugins = ("tests.faults.tally", "tests.input_tally")

DATABASE_ROUTES = ("direct", "pgbouncer")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "database_route" in metafunc.fixturenames and metafunc.definition.get_closest_marker(
        "through_pgbouncer"
    ):
        # Session scope: pytest groups the tests by route, so each route's
        # service starts once rather than once per module.
        metafunc.parametrize("database_route", DATABASE_ROUTES, indirect=True, scope="session")


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Cluster]:
    base = Path(tempfile.mkdtemp(prefix="orderstream-test-"))
    cluster = start_cluster(base, durable=False)
    try:
        yield cluster
    finally:
        stop_cluster(cluster, mode="fast")
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def pgbouncer(pg_cluster: Cluster) -> Iterator[PgBouncer]:
    directory = Path(tempfile.mkdtemp(prefix="orderstream-pgbouncer-"))
    bouncer = start_pgbouncer(directory, pg_cluster)
    try:
        yield bouncer
    finally:
        stop_pgbouncer(bouncer)
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def database_route(request: pytest.FixtureRequest) -> str:
    """How the service reaches the cluster: "direct" unless parametrized."""
    return str(getattr(request, "param", "direct"))


@pytest.fixture(scope="session")
def service_env(
    pg_cluster: Cluster, database_route: str, request: pytest.FixtureRequest
) -> dict[str, str]:
    """The environment a deployment would give the service, for this cluster."""
    route: dict[str, str] = {}
    if database_route == "pgbouncer":
        bouncer: PgBouncer = request.getfixturevalue("pgbouncer")
        route = bouncer.service_env()
    return {
        **pg_cluster.service_env(),
        **route,
        "ORDERSTREAM_HOST": "127.0.0.1",
        "ORDERSTREAM_PORT": "0",
        "ORDERSTREAM_PAGE_TOKEN_KEY": secrets.token_urlsafe(32),
        "ORDERSTREAM_HEALTH_CHECK_INTERVAL": "0.2",
        "ORDERSTREAM_POOL_MAX_SIZE": "8",
        "ORDERSTREAM_EVENT_LOOP": "asyncio",
    }


@pytest.fixture(scope="session")
async def app(service_env: dict[str, str]) -> AsyncIterator[App]:
    running = await App.start(Settings.from_env(service_env))
    try:
        yield running
    finally:
        await running.stop(grace=5)


@pytest.fixture(scope="session")
async def channel(app: App) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as chan:
        yield chan


@pytest.fixture(scope="session")
def orders(channel: grpc.aio.Channel) -> order_service_pb2_grpc.OrderServiceStub:
    return order_service_pb2_grpc.OrderServiceStub(channel)


@pytest.fixture(scope="session")
def events(channel: grpc.aio.Channel) -> event_service_pb2_grpc.EventServiceStub:
    return event_service_pb2_grpc.EventServiceStub(channel)


@pytest.fixture(scope="session")
def health(channel: grpc.aio.Channel) -> health_pb2_grpc.HealthStub:
    return health_pb2_grpc.HealthStub(channel)


@pytest.fixture(scope="session")
async def admin_db(pg_cluster: Cluster, app: App) -> AsyncIterator[asyncpg.Pool]:
    """A superuser pool for looking behind the service's back (and after
    `app`, so the schema exists)."""
    pool = await asyncpg.create_pool(
        pg_cluster.dsn(admin=True), ssl=admin_ssl_context(pg_cluster), min_size=1, max_size=4
    )
    try:
        yield pool
    finally:
        await pool.close()
