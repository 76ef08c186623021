"""Fixtures of the fault suite: its own cluster, the proxy between the
service's pool and that cluster, the service process under test, and the
`scenario` fixture that checks the invariants after every scenario."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import asyncpg
import grpc
import pytest

from devcluster.cluster import Cluster
from devcluster.process import json_records
from devcluster.throwaway import scratch_directory
from service.db.migrate import migrate
from tests.faults.cluster import GATE_SQL, Admin, FaultCluster
from tests.faults.history import (
    EVENTS_SUBJECT,
    HISTORY_EVENTS,
    HISTORY_ORDERS,
    ORDERS_CUSTOMER,
    SHORT_EVENTS,
    SHORT_SUBJECT,
)
from tests.faults.invariants import check_invariants
from tests.faults.ledger import Ledger
from tests.faults.service import RunningProcess, channel_to, running_process, service_env
from tests.faults.tally import TALLY
from tests.support.database import admin_ssl_context, through_proxy
from tests.support.stubs import stub_fixtures
from tests.support.tcp_proxy import TcpProxy


@pytest.fixture(scope="session")
async def fault_cluster() -> AsyncIterator[FaultCluster]:
    with scratch_directory("orderstream-faults-") as base:
        faults = FaultCluster(base)
        await faults.start()
        try:
            await _prepare(faults.current)
            yield faults
        finally:
            await faults.stop("fast")


async def _prepare(cluster: Cluster) -> None:
    """The schema (as its owner) and the fault gate's triggers."""
    conn = await asyncpg.connect(cluster.dsn(), ssl=admin_ssl_context(cluster))
    try:
        await migrate(conn)
    finally:
        await conn.close()
    conn = await asyncpg.connect(cluster.dsn(admin=True), ssl=admin_ssl_context(cluster))
    try:
        await conn.execute(GATE_SQL)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
async def admin(fault_cluster: FaultCluster) -> AsyncIterator[Admin]:
    admin = Admin(fault_cluster)
    await admin.open()
    try:
        yield admin
    finally:
        await admin.close()


@pytest.fixture(scope="session")
async def proxy(fault_cluster: FaultCluster) -> AsyncIterator[TcpProxy]:
    async with TcpProxy(fault_cluster.current.port) as running:
        yield running


@pytest.fixture(scope="session")
def fault_env(fault_cluster: FaultCluster, proxy: TcpProxy) -> dict[str, str]:
    """Settings of a service whose pool goes through the proxy."""
    return service_env(through_proxy(fault_cluster.current, proxy.port))


@pytest.fixture(scope="session")
async def service(fault_env: dict[str, str]) -> AsyncIterator[RunningProcess]:
    """One process for the whole suite: it must survive every scenario."""
    async with running_process(fault_env) as running:
        yield running


@pytest.fixture(scope="session")
async def channel(service: RunningProcess) -> AsyncIterator[grpc.aio.Channel]:
    async with channel_to(service.target) as chan:
        yield chan


# The stubs again, rather than tests/fixtures/fix_service.py's: those are
# session fixtures, cached on whichever channel the first test gave them.
orders, events, health = stub_fixtures()


@dataclass(frozen=True)
class History:
    """Rows written before any fault, which a stream that ends OK must
    deliver in full."""

    event_ids: list[int]
    order_ids: list[int]


@pytest.fixture(scope="session")
async def history(admin: Admin) -> History:
    for subject, count in ((EVENTS_SUBJECT, HISTORY_EVENTS), (SHORT_SUBJECT, SHORT_EVENTS)):
        await admin.execute(
            """
            INSERT INTO events (type, source, subject, time, payload)
            SELECT 'history', '/faults', $1, now(),
                   jsonb_build_object('n', g, 'pad', repeat('x', 60))
            FROM generate_series(1, $2::int) AS g
            """,
            subject,
            count,
        )
    # Every order has items (the service never writes one without).
    await admin.execute(
        """
        WITH created AS (
            INSERT INTO orders (customer_id, currency, total_cents)
            SELECT $1, 'EUR', g FROM generate_series(1, $2::int) AS g
            RETURNING id, total_cents
        )
        INSERT INTO order_items (order_id, line_no, sku, quantity, unit_price_cents)
        SELECT id, 1, 'HISTORY', 1, total_cents FROM created
        """,
        ORDERS_CUSTOMER,
        HISTORY_ORDERS,
    )
    event_ids = await admin.fetch(
        "SELECT id FROM events WHERE subject = $1 ORDER BY id", EVENTS_SUBJECT
    )
    order_ids = await admin.fetch(
        "SELECT id FROM orders WHERE customer_id = $1 ORDER BY id", ORDERS_CUSTOMER
    )
    return History([r["id"] for r in event_ids], [r["id"] for r in order_ids])


@dataclass
class Scenario:
    """What one scenario accumulates for the invariants: the ledger of its
    writes."""

    ledger: Ledger = field(default_factory=Ledger)


@pytest.fixture
async def scenario(
    service: RunningProcess, channel: grpc.aio.Channel, admin: Admin, proxy: TcpProxy
) -> AsyncIterator[Scenario]:
    current = Scenario()
    logged_before = len(service.child.lines)
    yield current
    # A scenario that failed halfway must not leave the network broken.
    proxy.resume()
    internal = [
        record.get("error", record)
        for record in json_records(service.child.lines[logged_before:])
        if record.get("message") == "internal error"
    ]
    assert not internal, "the service answered INTERNAL:\n" + "\n".join(map(str, internal))
    totals = await check_invariants(service.target, admin, current.ledger, channel)
    TALLY.totals.add(totals)
