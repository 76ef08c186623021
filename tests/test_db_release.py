"""Connections going back to the pool (service/db/runner.py): every one
returns, whether its call ends normally, leaves a transaction open, is
cancelled, is cancelled again while the release waits, or loses its
connection first. A call that ends normally is released without
asyncpg's Pool.release (and its shield task), for speed, so these tests also
fail if asyncpg's pool changes the shape that bypass relies on."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest

from service.db.runner import Database
from tests.support.database import admin_ssl_context
from tests.support.polling import eventually

SLEEPING = "SELECT pg_sleep(30) /* release test */"


class NoDeadline:
    def time_remaining(self) -> float | None:
        return None


CALL = NoDeadline()


@pytest.fixture
async def pool_of_one(pg_cluster) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(
        pg_cluster.dsn(admin=True), ssl=admin_ssl_context(pg_cluster), min_size=1, max_size=1
    )
    try:
        yield pool
    finally:
        pool.terminate()


def database(pool: asyncpg.Pool) -> Database:
    # A short acquire timeout: a connection that never came back fails the
    # next acquire quickly (PoolExhausted) instead of hanging the test.
    return Database(pool, acquire_timeout=2, command_timeout=30)


async def sleepers(admin_db: asyncpg.Pool) -> int:
    return await admin_db.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE query = $1 AND state = 'active'", SLEEPING
    )


async def test_a_released_connection_is_idle_again(pool_of_one):
    db = database(pool_of_one)
    for expected in (1, 2, 3):  # a pool of one: each call needs the last one's release
        assert await db.fetchrow(CALL, "SELECT $1::int AS n", expected) == (expected,)
    assert pool_of_one.get_idle_size() == 1


async def test_a_transaction_left_open_is_rolled_back_on_release(pool_of_one):
    db = database(pool_of_one)
    conn = await db.acquire(CALL)
    await conn.execute("BEGIN; CREATE TEMPORARY TABLE left_open (n int)")
    await db.release(conn)
    async with db.connection(CALL) as again:
        assert not again.is_in_transaction()
        assert await again.fetchval("SELECT to_regclass('pg_temp.left_open')") is None


async def test_releasing_twice_is_harmless(pool_of_one):
    db = database(pool_of_one)
    async with db.connection(CALL) as conn:
        assert await conn.fetchval("SELECT 1") == 1
    await db.release(conn)
    assert await db.fetchrow(CALL, "SELECT 1") == (1,)


async def test_a_connection_ended_before_its_release_fails_nothing(pool_of_one):
    db = database(pool_of_one)
    async with db.connection(CALL) as conn:
        assert await conn.fetchval("SELECT 1") == 1
        conn._con.terminate()  # asyncpg takes the holder back by itself
    assert await db.fetchrow(CALL, "SELECT 2") == (2,)  # the pool is whole again


async def test_a_connection_ended_during_its_release_fails_nothing(pool_of_one):
    db = database(pool_of_one)
    conn = await db.acquire(CALL)
    assert await conn.fetchval("SELECT 1") == 1
    behind_the_proxy = conn._con
    releasing = asyncio.ensure_future(db.release(conn))
    # One turn of the loop: the release checks the connection and
    # schedules its shielded part, which has not run yet ...
    await asyncio.sleep(0)
    # ... when the connection ends (asyncpg takes its holder back).
    behind_the_proxy.terminate()
    await releasing  # asyncpg: "release() called on a free connection holder"
    assert await db.fetchrow(CALL, "SELECT 2") == (2,)  # the pool is whole again


@pytest.mark.parametrize("cancellations", [1, 2, 5])
async def test_a_cancelled_call_returns_its_connection(pool_of_one, admin_db, cancellations):
    """Cancelled while its statement runs, and then again while the release
    waits for that statement's cancellation to finish: the connection is
    returned, or ended and replaced, and the statement stops on the server."""
    db = database(pool_of_one)
    call = asyncio.ensure_future(db.fetchrow(CALL, SLEEPING))
    await eventually(lambda: _one_sleeper(admin_db), what="the statement running")
    for _ in range(cancellations):
        call.cancel()
        await asyncio.sleep(0)
    with pytest.raises(asyncio.CancelledError):
        await call
    assert await db.fetchrow(CALL, "SELECT 3") == (3,)
    await eventually(lambda: _no_sleeper(admin_db), what="the statement stopped")


async def _one_sleeper(admin_db: asyncpg.Pool) -> bool:
    return await sleepers(admin_db) == 1


async def _no_sleeper(admin_db: asyncpg.Pool) -> bool:
    return await sleepers(admin_db) == 0
