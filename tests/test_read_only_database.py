"""A primary that turns read-only under the service (an old primary fenced
for a failover, or an address that now leads elsewhere). The write that
meets SQLSTATE 25006 answers UNAVAILABLE with DATABASE_READ_ONLY and drops
the pool's connections, so behind an address re-pointed to the new
primary the next call is served there; health is NOT_SERVING while no
writable server is reachable (new connections, made with
target_session_attrs=read-write, refuse a read-only one) and SERVING again
after, with no restart. Clusters of their own: the read-only switch is
server-wide.

The failover itself (a standby promoted under load, the service following
it) is tests/faults/test_failover.py.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import AsyncIterator, Iterator

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devcluster.cluster import Cluster, start_cluster, stop_cluster
from devcluster.throwaway import scratch_directory, throwaway_cluster
from orderstream.orders.v1 import order_service_pb2_grpc
from service.db.migrate import migrate
from tests.support.apps import app_with_channel
from tests.support.database import admin_ssl_context, connect_to, through_proxy
from tests.support.polling import eventually
from tests.support.requests import create_request
from tests.support.status import StatusDetails, rpc_error
from tests.support.tcp_proxy import TcpProxy

pytestmark = pytest.mark.slow

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
NEVER = "3600"  # a health check interval no test outlives


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with throwaway_cluster("orderstream-readonly-", durable=False) as cluster:
        yield cluster


@pytest.fixture(scope="module")
async def other_cluster(cluster: Cluster) -> AsyncIterator[Cluster]:
    """Where the re-pointed address leads: a writable server with the schema,
    the first one's certificate (the proxy's address stays verified) and
    its password for the service's role."""
    with scratch_directory("orderstream-writable-") as base:
        # make_certificates keeps the files it finds in the cluster's tls/.
        shutil.copytree(cluster.certificates.ca_cert.parent, base / "tls")
        other = start_cluster(base, durable=False)
        try:
            async with connect_to(other, "postgres", admin=True) as conn:
                # Utility statements take no parameters; token_urlsafe needs no quoting.
                await conn.execute(f"ALTER ROLE {other.app_user} PASSWORD '{cluster.app_password}'")
            other = dataclasses.replace(other, app_password=cluster.app_password)
            async with connect_to(other, other.database) as conn:
                await migrate(conn)
            yield other
        finally:
            stop_cluster(other)


@pytest.fixture
async def admin(cluster: Cluster) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(cluster.dsn(admin=True), ssl=admin_ssl_context(cluster))
    try:
        yield conn
    finally:
        await set_read_only(conn, False)
        await conn.close()


async def set_read_only(admin: asyncpg.Connection, read_only: bool) -> None:
    """Every session's next transaction is read-only (or not). pg_reload_conf
    only signals the postmaster, which then signals every session; a
    session reads the setting before its next statement once signalled. So
    this returns once the admin's own session has it: the postmaster has
    signalled them all by then (a statement sent sooner could still run
    under the old setting, as one did in CI)."""
    value = "on" if read_only else "off"
    await admin.execute(f"ALTER SYSTEM SET default_transaction_read_only = {value}")
    await admin.execute("SELECT pg_reload_conf()")

    async def reloaded() -> bool:
        return bool(await admin.fetchval("SHOW default_transaction_read_only") == value)

    await eventually(reloaded, what=f"default_transaction_read_only = {value}")


async def health_is(health: health_pb2_grpc.HealthStub, status: int) -> bool:
    response = await health.Check(health_pb2.HealthCheckRequest(service=""))
    return bool(response.status == status)


def read_only_answer(failed: StatusDetails) -> tuple[grpc.StatusCode, str | None, bool]:
    reason = failed.error_info.reason if failed.error_info is not None else None
    return failed.code, reason, failed.retry_info is not None


async def test_a_write_on_a_read_only_server_drops_the_pools_connections(
    service_env, cluster, other_cluster, admin
):
    """Behind one address, re-pointed: without the drop, the pool's open
    connections would stay on the read-only server, failing every write."""
    async with TcpProxy(cluster.port) as proxy:
        env = {
            **service_env,
            **through_proxy(cluster, proxy.port).service_env(),
            # Only calls notice (health would find it too, and drop the pool first).
            "ORDERSTREAM_HEALTH_CHECK_INTERVAL": NEVER,
            "ORDERSTREAM_POOL_MIN_SIZE": "2",
        }
        async with app_with_channel(env) as (_, channel):
            orders = order_service_pb2_grpc.OrderServiceStub(channel)
            await orders.CreateOrder(create_request(), timeout=10)
            await set_read_only(admin, True)
            proxy.repoint(other_cluster.port)

            failed = await rpc_error(orders.CreateOrder(create_request(), timeout=10))
            assert read_only_answer(failed) == (
                grpc.StatusCode.UNAVAILABLE,
                "DATABASE_READ_ONLY",
                True,
            )
            # Every call from now on is served by the writable server.
            for _ in range(4):
                request = create_request()
                created = await orders.CreateOrder(request, timeout=10)
                async with connect_to(other_cluster, other_cluster.database) as writable:
                    assert (
                        await writable.fetchval(
                            "SELECT id FROM orders WHERE request_id = $1", request.request_id
                        )
                        == created.id
                    )


async def test_health_is_not_serving_while_the_server_is_read_only(service_env, cluster, admin):
    env = {
        **service_env,
        **cluster.service_env(),
        "ORDERSTREAM_HEALTH_CHECK_INTERVAL": "0.2",
    }
    async with app_with_channel(env) as (_, channel):
        orders = order_service_pb2_grpc.OrderServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        await eventually(lambda: health_is(health, SERVING), what="SERVING")

        await set_read_only(admin, True)
        await eventually(lambda: health_is(health, NOT_SERVING), what="NOT_SERVING")
        # The pool's connections were dropped: new ones refuse the server at
        # connect time, with the same answer as a write that met 25006.
        failed = await rpc_error(orders.CreateOrder(create_request(), timeout=10))
        assert read_only_answer(failed) == (grpc.StatusCode.UNAVAILABLE, "DATABASE_READ_ONLY", True)

        await set_read_only(admin, False)
        await eventually(lambda: health_is(health, SERVING), what="SERVING again")
        assert (await orders.CreateOrder(create_request(), timeout=10)).id > 0
