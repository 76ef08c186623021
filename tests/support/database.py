"""The cluster seen from behind the service's back: TLS for admin
connections, row counts, row locks, what the service's backends are doing,
and what the server logged."""

from __future__ import annotations

import contextlib
import dataclasses
import ssl
from collections.abc import AsyncIterator

import asyncpg

from devcluster.cluster import Cluster, create_database
from tests.support.requests import unique

# The cluster writes its server log here (see devcluster/cluster.py's layout).
SERVER_LOG = "server.log"


def admin_ssl_context(cluster: Cluster) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(cluster.certificates.ca_cert))


def through_proxy(cluster: Cluster, port: int) -> Cluster:
    """`cluster` as reached through a proxy on 127.0.0.1:`port` (the server
    certificate names 127.0.0.1, so verify-full still holds)."""
    return dataclasses.replace(cluster, host="127.0.0.1", port=port)


def multi_host_dsn(cluster: Cluster, *addresses: str) -> str:
    """`cluster`'s URL with libpq's list of `addresses` ("host:port") in
    place of its one host."""
    return cluster.dsn().replace(
        f"@{cluster.host}:{cluster.port}/", "@" + ",".join(addresses) + "/"
    )


@contextlib.asynccontextmanager
async def admin_pool(
    cluster: Cluster, *, min_size: int, max_size: int
) -> AsyncIterator[asyncpg.Pool]:
    """A superuser pool on `cluster`, over TLS, closed on the way out."""
    pool = await asyncpg.create_pool(
        cluster.dsn(admin=True),
        ssl=admin_ssl_context(cluster),
        min_size=min_size,
        max_size=max_size,
    )
    try:
        yield pool
    finally:
        await pool.close()


async def table_counts(db: asyncpg.Pool) -> dict[str, int]:
    """Row counts of every table the service writes (tests run one at a time)."""
    return {
        table: await db.fetchval(f"SELECT count(*) FROM {table}")
        for table in ("orders", "order_items", "events", "publish_requests", "status_requests")
    }


@contextlib.asynccontextmanager
async def row_locked(db: asyncpg.Pool, order_id: int) -> AsyncIterator[None]:
    """Holds a row lock on an order, so service statements on it block."""
    async with db.acquire() as conn, conn.transaction():
        await conn.execute("SELECT 1 FROM orders WHERE id = $1 FOR UPDATE", order_id)
        yield


async def backends_running(db: asyncpg.Pool, fragment: str) -> int:
    """Service backends currently executing a statement containing `fragment`."""
    return await db.fetchval(
        """
        SELECT count(*) FROM pg_stat_activity
        WHERE application_name = 'orderstream' AND state = 'active'
          AND position($1 IN query) > 0
        """,
        fragment,
    )


class ServerLog:
    """What the PostgreSQL server logged since this object was made."""

    def __init__(self, cluster: Cluster) -> None:
        self._path = cluster.data_dir / SERVER_LOG
        self._start = self._path.stat().st_size

    def new_text(self) -> str:
        with open(self._path, "rb") as handle:
            handle.seek(self._start)
            return handle.read().decode(errors="replace")


async def nothing_left_running(admin_db) -> bool:
    """No service backend is still copying or sits in an open transaction."""
    return (
        await admin_db.fetchval(
            """
            SELECT count(*) FROM pg_stat_activity
            WHERE application_name = 'orderstream'
              AND (state LIKE 'idle in transaction%' OR (state = 'active' AND query LIKE 'COPY%'))
            """
        )
        == 0
    )


async def waiting_on_lock(admin_db, fragment: str) -> bool:
    return (
        await admin_db.fetchval(
            """
            SELECT count(*) FROM pg_stat_activity
            WHERE application_name = 'orderstream' AND wait_event_type = 'Lock'
              AND position($1 IN query) > 0
            """,
            fragment,
        )
        > 0
    )


async def copy_running(db: asyncpg.Pool) -> bool:
    return (
        await db.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'orderstream' "
            "AND state = 'active' AND query LIKE 'COPY%'"
        )
        > 0
    )


async def some_rows_copied(db: asyncpg.Pool) -> bool:
    """Rows that COPY statements in progress have written (uncommitted)."""
    return (
        await db.fetchval("SELECT coalesce(sum(tuples_processed), 0) FROM pg_stat_progress_copy")
        > 0
    )


@contextlib.asynccontextmanager
async def connect_to(
    cluster: Cluster, database: str, *, admin: bool = False
) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(
        cluster.dsn(admin=admin, database=database), ssl=admin_ssl_context(cluster)
    )
    try:
        yield conn
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def scratch_database(cluster: Cluster, prefix: str) -> AsyncIterator[str]:
    """A new database owned by the service's role (its name), dropped afterwards."""
    name = await create_database(cluster, unique(prefix).replace("-", "_"))
    try:
        yield name
    finally:
        conn = await asyncpg.connect(
            cluster.dsn(admin=True, database="postgres"), ssl=admin_ssl_context(cluster)
        )
        try:
            await conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        finally:
            await conn.close()
