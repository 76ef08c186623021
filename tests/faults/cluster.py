"""A PostgreSQL cluster of the fault suite's own, and the controls a test
uses to break it.

Own cluster, because restarting or crashing the session's shared cluster
would break every other test's connections. The controls block (pg_ctl), so
they run in a thread: the proxy and the callers live on the test's event
loop and must keep running while PostgreSQL goes down and up.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import asyncpg

from devcluster.cluster import Cluster, start_cluster, stop_cluster
from tests.support.database import admin_ssl_context

T = TypeVar("T")

# The gate's advisory locks: the two-int form with a class of its own
# stays out of events_safe_horizon(), which reads the feed's class only.
GATE_LOCK_CLASS = 7007

# Rows whose key starts with "gate:" wait at COMMIT for an advisory lock the
# test holds: a deferred constraint trigger runs as part of the commit, after
# every statement of the transaction, so the test can act at exactly that
# moment (e.g. reset the connection so the commit's acknowledgement is lost).
# The WHEN clause is evaluated when the row is written, so other rows queue
# nothing.
GATE_SQL = f"""
CREATE OR REPLACE FUNCTION fault_gate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock({GATE_LOCK_CLASS}, hashtext(to_jsonb(NEW) ->> TG_ARGV[0]));
    RETURN NULL;
END
$$;
DROP TRIGGER IF EXISTS fault_gate_at_commit ON orders;
CREATE CONSTRAINT TRIGGER fault_gate_at_commit AFTER INSERT ON orders
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    WHEN (NEW.customer_id LIKE 'gate:%') EXECUTE FUNCTION fault_gate('customer_id');
DROP TRIGGER IF EXISTS fault_gate_at_commit ON events;
CREATE CONSTRAINT TRIGGER fault_gate_at_commit AFTER INSERT ON events
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    WHEN (NEW.subject LIKE 'gate:%') EXECUTE FUNCTION fault_gate('subject');
"""

_CONNECTION_LOST = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,  # still recovering after a restart or crash
)


class FaultCluster:
    """Stop (fast / immediate), start, restart, kill one backend."""

    def __init__(self, base_dir: Path) -> None:
        self.base_dir = base_dir
        self.cluster: Cluster | None = None

    @classmethod
    def running(cls, cluster: Cluster) -> FaultCluster:
        """The controls of a cluster started elsewhere (a promoted standby)."""
        faults = cls(cluster.base_dir)
        faults.cluster = cluster
        return faults

    @property
    def current(self) -> Cluster:
        assert self.cluster is not None, "the fault cluster is not running"
        return self.cluster

    async def start(self) -> None:
        # Durable: an immediate stop is a crash, and with synchronous_commit
        # off a crash loses commits that were acknowledged.
        self.cluster = await asyncio.to_thread(start_cluster, self.base_dir, durable=True)

    async def stop(self, mode: str) -> None:
        await asyncio.to_thread(stop_cluster, self.base_dir, mode=mode)

    async def restart(self, mode: str) -> None:
        await self.stop(mode)
        await self.start()

    @staticmethod
    def kill_backend(pid: int) -> None:
        """SIGKILL one backend: the postmaster treats it as a crash, ends
        every other backend and recovers (like a segfault in production).
        The test runs as root or as the server's own user, so it may."""
        os.kill(pid, signal.SIGKILL)


def kill_server(cluster: Cluster) -> None:
    """SIGKILL the whole server at one instant, postmaster and every child
    (backends, WAL sender, ...), as a lost machine would end it: no
    shutdown, nothing more sent to anyone. Each child leads a process group
    of its own (PostgreSQL's InitPostmasterChild), so one killpg would end
    the postmaster alone and leave backends to finish what they were
    doing. All are stopped first, the postmaster before it can fork again,
    so none acts while the others die."""
    postmaster = int((cluster.data_dir / "postmaster.pid").read_text().split()[0])
    os.kill(postmaster, signal.SIGSTOP)
    server = [postmaster, *_children(postmaster)]
    for pid in server:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
    for pid in server:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _children(parent: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            # pid (comm) state ppid ...: comm may hold spaces and parentheses.
            if int(stat.read_text().rpartition(")")[2].split()[1]) == parent:
                children.append(int(stat.parent.name))
    return children


class Admin:
    """A superuser pool straight to the cluster (never through the proxy),
    for looking behind the service's back. Its connections die with every
    restart too: each query is retried until the server answers again."""

    def __init__(self, faults: FaultCluster) -> None:
        self._faults = faults
        self._pool: asyncpg.Pool | None = None

    async def open(self) -> None:
        cluster = self._faults.current
        self._pool = await asyncpg.create_pool(
            cluster.dsn(admin=True), ssl=admin_ssl_context(cluster), min_size=0, max_size=4
        )

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()

    async def _retrying(self, run: Callable[[asyncpg.Pool], Awaitable[T]]) -> T:
        assert self._pool is not None
        for _ in range(200):
            try:
                return await run(self._pool)
            except _CONNECTION_LOST:
                await asyncio.sleep(0.05)  # the server is restarting; nothing to await
        raise AssertionError("the fault cluster did not come back")

    async def fetch(self, query: str, *args: object) -> list[asyncpg.Record]:
        return await self._retrying(lambda pool: pool.fetch(query, *args))

    async def fetchval(self, query: str, *args: object) -> object:
        return await self._retrying(lambda pool: pool.fetchval(query, *args))

    async def execute(self, query: str, *args: object) -> str:
        return await self._retrying(lambda pool: pool.execute(query, *args))

    @contextlib.asynccontextmanager
    async def gate(self, key: str) -> AsyncIterator[None]:
        """Holds the advisory lock that rows keyed `key` wait for at COMMIT.
        A direct connection: closing it releases the lock even if the test
        fails, and a restart releases it too."""
        cluster = self._faults.current
        conn = await asyncpg.connect(cluster.dsn(admin=True), ssl=admin_ssl_context(cluster))
        try:
            await conn.execute("SELECT pg_advisory_lock($1, hashtext($2))", GATE_LOCK_CLASS, key)
            yield
        finally:
            with contextlib.suppress(*_CONNECTION_LOST):
                await conn.close(timeout=5)

    async def service_backends(self) -> list[asyncpg.Record]:
        return await self.fetch(
            """
            SELECT pid, state, wait_event_type, wait_event, query FROM pg_stat_activity
            WHERE application_name = 'orderstream' AND backend_type = 'client backend'
              AND pid <> pg_backend_pid()
            """
        )

    async def waiting_at_gate(self) -> list[int]:
        """Service backends blocked on a gate's lock."""
        return [
            row["pid"] for row in await self.service_backends() if row["wait_event"] == "advisory"
        ]

    async def terminate(self, pid: int) -> bool:
        return bool(await self.fetchval("SELECT pg_terminate_backend($1)", pid))
