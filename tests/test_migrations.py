"""Migrations on fresh databases: many `python -m service migrate` processes
at once apply each file exactly once; a rerun applies nothing; a migration's
SQL and its schema_migrations row commit (or roll back) together."""

from __future__ import annotations

import asyncio
import contextlib
import re

import asyncpg
import pytest

from devcluster.process import ServiceProcess, process_env, service_process
from service.db import migrate as migrate_module
from service.db.migrate import available_migrations, migrate
from tests.support.database import connect_to
from tests.support.polling import eventually

PROCESSES = 4
CREATED_TABLE = re.compile(r"^CREATE TABLE (\w+)", re.MULTILINE)


def advisory_lock_sql(function: str) -> tuple[str, tuple[int, ...]]:
    """`SELECT function(key)` for the key migrate() serialises on (one bigint
    or two integers)."""
    key = migrate_module._ADVISORY_LOCK_KEY
    parts = key if isinstance(key, tuple) else (key,)
    placeholders = ", ".join(f"${i}" for i in range(1, len(parts) + 1))
    return f"SELECT {function}({placeholders})", parts


async def applied_by(child: ServiceProcess) -> list[str]:
    assert await child.exit_code() == 0, child.output
    return list((await child.record("migrations done"))["applied"])


async def recorded(conn: asyncpg.Connection) -> list[tuple[int, str]]:
    rows = await conn.fetch("SELECT version, name FROM schema_migrations ORDER BY version")
    return [(r["version"], r["name"]) for r in rows]


def expected_tables() -> set[str]:
    tables = {name for m in available_migrations() for name in CREATED_TABLE.findall(m.sql)}
    assert {"orders", "order_items", "events"} <= tables
    return tables


@pytest.mark.parametrize("gated", [True, False], ids=["all-waiting-on-the-lock", "as-they-come"])
async def test_concurrent_migrate_processes_apply_each_migration_exactly_once(
    gated, fresh_database, pg_cluster, service_env
):
    """`gated`: the test holds the migration lock until all four processes
    wait for it, so they certainly contend; otherwise they just start at once."""
    migrations = available_migrations()
    env = process_env(service_env, DATABASE_URL=pg_cluster.dsn(database=fresh_database))
    async with connect_to(pg_cluster, fresh_database, admin=True) as gate:
        lock, key = advisory_lock_sql("pg_advisory_lock")
        unlock, _ = advisory_lock_sql("pg_advisory_unlock")
        if gated:
            await gate.execute(lock, *key)
        async with contextlib.AsyncExitStack() as stack:
            children = [
                await stack.enter_async_context(service_process(env, "migrate"))
                for _ in range(PROCESSES)
            ]
            if gated:

                async def all_waiting() -> bool:
                    waiting = await gate.fetchval(
                        """
                        SELECT count(*) FROM pg_stat_activity
                        WHERE datname = $1 AND application_name = 'orderstream'
                          AND wait_event_type = 'Lock' AND wait_event = 'advisory'
                        """,
                        fresh_database,
                    )
                    return waiting == PROCESSES

                await eventually(all_waiting, what="every process to wait for the lock")
                assert await gate.fetchval(unlock, *key)
            applied = await asyncio.gather(*(applied_by(child) for child in children))

    # Between them the processes applied every migration, each exactly once.
    assert sorted(name for names in applied for name in names) == sorted(m.name for m in migrations)
    async with connect_to(pg_cluster, fresh_database) as conn:
        assert await recorded(conn) == [(m.version, m.name) for m in migrations]
        for table in expected_tables():
            assert await conn.fetchval("SELECT to_regclass($1)::text", table) == table

        async with service_process(env, "migrate") as rerun:
            assert await applied_by(rerun) == []
        assert await recorded(conn) == [(m.version, m.name) for m in migrations]


async def test_migration_and_its_record_commit_or_roll_back_together(fresh_database, pg_cluster):
    """A table squatting on a name the first migration creates makes it fail
    part-way: none of its tables and no schema_migrations row survive, and
    the lock is released. Without the squatter it applies, and its tables and
    rows are visible to other sessions (committed)."""
    migrations = available_migrations()
    first = migrations[0]
    created = CREATED_TABLE.findall(first.sql)
    assert len(created) >= 2, "needs a migration that creates more than one table"
    squatted = created[-1]
    async with (
        connect_to(pg_cluster, fresh_database) as conn,
        connect_to(pg_cluster, fresh_database) as other,
    ):
        await conn.execute(f"CREATE TABLE {squatted} (squatter integer)")
        with pytest.raises(asyncpg.DuplicateTableError):
            await migrate(conn)
        assert not conn.is_in_transaction()
        for table in created[:-1]:
            assert await other.fetchval("SELECT to_regclass($1)", table) is None
        assert await recorded(other) == []
        held = await other.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = $1",
            conn.get_server_pid(),
        )
        assert held == 0

        await conn.execute(f"DROP TABLE {squatted}")
        assert await migrate(conn) == [m.name for m in migrations]
        assert await recorded(other) == [(m.version, m.name) for m in migrations]
        for table in expected_tables():
            assert await other.fetchval("SELECT to_regclass($1)::text", table) == table
        assert await migrate(conn) == []
