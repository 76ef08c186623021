"""A multi-host DATABASE_URL whose first host takes connections and never
answers (a lost machine: no refusal, nothing at all): every host gets its
own share of the connect timeout (service/db/hosts.py), so the pool and
the feed's direct connection reach the next host in time, as libpq's
per-host connect_timeout would; asyncpg alone spends the whole timeout on
the silent host. (The TLS side of several hosts, each verified against
its own name, is in tests/test_database_tls.py; a failover under load is
tests/faults/test_failover.py.)"""

from __future__ import annotations

import time

import pytest

from service.db.pool import close_pool, connect_direct, open_pool
from service.errors import StartupError
from service.settings import Settings
from tests.support.database import multi_host_dsn
from tests.support.tcp_proxy import TcpProxy

ACQUIRE_TIMEOUT = 2.0


def silent_first(service_env, pg_cluster, silent: TcpProxy) -> Settings:
    url = multi_host_dsn(pg_cluster, f"127.0.0.1:{silent.port}", f"127.0.0.1:{pg_cluster.port}")
    return Settings.from_env(
        {
            **service_env,
            "DATABASE_URL": url,
            "ORDERSTREAM_POOL_ACQUIRE_TIMEOUT": str(ACQUIRE_TIMEOUT),
        }
    )


async def test_a_silent_first_host_leaves_time_for_the_next(service_env, pg_cluster):
    async with TcpProxy(pg_cluster.port) as silent:
        silent.blackhole()
        settings = silent_first(service_env, pg_cluster, silent)
        started = time.monotonic()
        pool = await open_pool(settings)
        try:
            port = await pool.fetchval("SELECT inet_server_port()")
            conn = await connect_direct(settings)
            try:
                assert await conn.fetchval("SELECT inet_server_port()") == pg_cluster.port
            finally:
                await conn.close()
        finally:
            await close_pool(pool, 5)
        assert port == pg_cluster.port
        assert silent.connections >= 1  # the silent host was tried first
        # Its share only, half the timeout: within the timeout, where
        # asyncpg alone would have spent all of it on the silent host and
        # failed.
        assert time.monotonic() - started < 3 * ACQUIRE_TIMEOUT


async def test_a_host_found_silent_is_tried_after_the_others(service_env, pg_cluster):
    async with TcpProxy(pg_cluster.port) as silent:
        silent.blackhole()
        settings = silent_first(service_env, pg_cluster, silent)
        first = await connect_direct(settings)
        await first.close()
        tried = silent.connections
        assert tried == 1
        # The next connections go to the host that answered, at once; the
        # silent one is left for when the others fail.
        for _ in range(3):
            conn = await connect_direct(settings)
            try:
                assert await conn.fetchval("SELECT inet_server_port()") == pg_cluster.port
            finally:
                await conn.close()
        assert silent.connections == tried

        # Once it answers again (here: tried when the only other host of a
        # URL refuses), it is back in its place.
        silent.resume()
        async with TcpProxy(pg_cluster.port) as gone:
            refusing = gone.port
        url = multi_host_dsn(pg_cluster, f"127.0.0.1:{refusing}", f"127.0.0.1:{silent.port}")
        conn = await connect_direct(Settings.from_env({**service_env, "DATABASE_URL": url}))
        await conn.close()
        conn = await connect_direct(settings)
        await conn.close()
        assert silent.connections == tried + 2


async def test_when_every_host_is_silent_the_error_says_so(service_env, pg_cluster):
    async with TcpProxy(pg_cluster.port) as silent:
        silent.blackhole()
        url = multi_host_dsn(pg_cluster, *[f"127.0.0.1:{silent.port}"] * 2)
        settings = Settings.from_env(
            {
                **service_env,
                "DATABASE_URL": url,
                "ORDERSTREAM_POOL_ACQUIRE_TIMEOUT": str(ACQUIRE_TIMEOUT),
            }
        )
        with pytest.raises(StartupError, match=r"cannot connect to the database at .*TimeoutError"):
            await open_pool(settings)
