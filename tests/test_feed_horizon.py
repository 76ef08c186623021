"""The feed's safe horizon (migrations 0002 and 0004) in its own key space:
an open writer of events holds it below its ids, including where the low
32 bits of its announcement wrap; nobody else's advisory lock does."""

from __future__ import annotations

import pytest

from devcluster.cluster import Cluster
from service.db.migrate import migrate
from tests.support.database import connect_to

INSERT_EVENT = """
INSERT INTO events (type, source, time, payload)
VALUES ('com.example.horizon', '/tests', now(), '{}') RETURNING id
"""


@pytest.fixture
async def migrated_database(pg_cluster: Cluster, fresh_database: str) -> str:
    async with connect_to(pg_cluster, fresh_database) as conn:
        await migrate(conn)
    return fresh_database


async def test_foreign_advisory_locks_do_not_hold_the_horizon_back(
    pg_cluster: Cluster, migrated_database: str
):
    async with (
        connect_to(pg_cluster, migrated_database) as foreign,
        connect_to(pg_cluster, migrated_database) as writer,
    ):
        # What Flyway and golang-migrate take, and another class's two-key lock.
        await foreign.execute("SELECT pg_advisory_lock(5), pg_advisory_lock(1, 2)")
        for _ in range(10):
            await writer.fetchval(INSERT_EVENT)
        assert await writer.fetchval("SELECT events_safe_horizon()") == 11


@pytest.mark.parametrize(
    "last_id",
    [0, 2**31 - 2, 2**32 - 2, 2**32 + 5, 3 * 2**32 - 1],
    ids=["start", "sign-bit", "wrap", "past-wrap", "third-wrap"],
)
async def test_an_open_writer_holds_the_horizon_below_its_ids(
    pg_cluster: Cluster, migrated_database: str, last_id: int
):
    async with (
        connect_to(pg_cluster, migrated_database) as open_writer,
        connect_to(pg_cluster, migrated_database) as later_writer,
    ):
        if last_id:
            await later_writer.execute("SELECT setval('events_id_seq', $1)", last_id)
        async with open_writer.transaction():
            pending = await open_writer.fetchval(INSERT_EVENT)
            assert pending == last_id + 1
            # Later writers commit ids above the open one's, far enough to
            # wrap the low 32 bits of the sequence past the open one's L.
            await later_writer.execute("SELECT setval('events_id_seq', $1)", last_id + 2**31 - 10)
            committed = await later_writer.fetchval(INSERT_EVENT)
            horizon = await later_writer.fetchval("SELECT events_safe_horizon()")
            assert horizon <= pending < committed
        assert await later_writer.fetchval("SELECT events_safe_horizon()") == committed + 1
