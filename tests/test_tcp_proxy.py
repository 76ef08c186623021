"""The test proxy (tests/support/tcp_proxy.py) breaks the network as the
fault suite needs it broken: a side that goes away behind a blackhole is
not seen from the other side until the network heals, and then it is, so
the server does not keep the backend of a client that is long gone (the
fault suite's "no leftover backends" would otherwise catch what the proxy
left, not what the service did)."""

from __future__ import annotations

import asyncpg

from tests.support.database import admin_ssl_context, through_proxy
from tests.support.polling import eventually
from tests.support.tcp_proxy import TcpProxy


async def test_a_client_gone_behind_a_blackhole_is_reset_once_it_heals(pg_cluster, admin_db):
    async with TcpProxy(pg_cluster.port) as proxy:
        dsn = through_proxy(pg_cluster, proxy.port).dsn(admin=True)
        client = await asyncpg.connect(dsn, ssl=admin_ssl_context(pg_cluster))
        backend = await client.fetchval("SELECT pg_backend_pid()")
        proxy.blackhole()
        client.terminate()  # its goodbye is dropped

        assert await _exists(admin_db, backend)  # nothing reached it
        proxy.resume()
        await eventually(
            lambda: _gone(admin_db, backend), what="the backend to end once the network heals"
        )


async def _exists(admin_db: asyncpg.Pool, pid: int) -> bool:
    return bool(
        await admin_db.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid)
    )


async def _gone(admin_db: asyncpg.Pool, pid: int) -> bool:
    return not await _exists(admin_db, pid)
