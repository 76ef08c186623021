"""Statements for one call, within the call's deadline."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

import asyncpg

from service.db.failures import CallDeadlineReached, DatabaseNotAnswering, PoolExhausted
from service.db.pool import left_the_primary, was_connecting

log = logging.getLogger(__name__)


class Call(Protocol):
    """What this layer needs of a call (a grpc.aio.ServicerContext): its
    remaining deadline in seconds, None if it has none."""

    def time_remaining(self) -> float | None: ...


class Database:
    """Runs statements for one call within the call's deadline.

    The remaining deadline bounds both the wait for a pooled connection and
    the statement itself; asyncpg cancels the query server-side when its
    timeout fires, and a cancelled call cancels it the same way.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        acquire_timeout: float,
        command_timeout: float,
    ):
        self.pool = pool
        self._acquire_timeout = acquire_timeout
        self._command_timeout = command_timeout

    @property
    def acquire_timeout(self) -> float:
        """Seconds a call waits for a pooled connection before PoolExhausted."""
        return self._acquire_timeout

    def query_timeout(self, context: Call) -> float:
        remaining = context.time_remaining()
        if remaining is None:
            return self._command_timeout
        if remaining <= 0:
            raise CallDeadlineReached
        return min(remaining, self._command_timeout)

    async def acquire(self, context: Call) -> asyncpg.Connection:
        """Takes a connection; the caller must hand it to `release`."""
        remaining = context.time_remaining()
        deadline_bound = remaining is not None and remaining < self._acquire_timeout
        wait = remaining if deadline_bound else self._acquire_timeout
        if wait is not None and wait <= 0:
            raise CallDeadlineReached
        try:
            # Not acquire(timeout=): asyncpg bounds that with asyncio.wait_for,
            # a new task per call; asyncio.timeout is a timer on this task.
            async with asyncio.timeout(wait):
                return await self.pool.acquire()
        except TimeoutError:
            if deadline_bound:
                raise CallDeadlineReached from None
            # Asked only after the timeout, so the hot path pays nothing for it.
            if was_connecting(self.pool):
                raise DatabaseNotAnswering(self._acquire_timeout) from None
            raise PoolExhausted(self._acquire_timeout) from None

    async def release(self, conn: asyncpg.Connection, *, finished: bool = False) -> None:
        """Returns `conn` to the pool; never fails the call.

        asyncpg shields the release itself (a new task under asyncio.shield),
        so cancellation cannot leak it. `finished`: the caller's statements
        all ended without an error. Then, unless a transaction was left
        open, nothing is left to roll back or to cancel, the release
        completes without waiting and a cancellation has nowhere to land
        (unless asyncpg closes the connection, past its query or age limit:
        a cancellation may then cut the close short, and it ends at once
        instead), so it is done directly, without that task: without it and
        the acquire's, GetOrder made 8% more calls a second
        (docs/benchmarks.md, unary calls). That reaches into asyncpg's pool
        as Pool.release does (the proxy's connection and holder), which is
        why asyncpg is held to one minor version; tests/test_db_release.py
        fails if that shape changes.

        A release fails only when the connection is beyond use: its reset
        failed (asyncpg then terminates it) or the server ended it while the
        release was under way (asyncpg already took it back: "release()
        called on a free connection holder", seen in the fault soak). Either
        way the pool is whole again, and the call's statements are done: a
        committed write must not be reported as failed because of it.
        """
        proxy: Any = conn  # the pool's PoolConnectionProxy
        underlying = proxy._con
        try:
            if underlying is None:
                return  # asyncpg took it back already: the server ended it
            if finished and not underlying.is_in_transaction():
                underlying._on_release()
                await proxy._holder.release(self._acquire_timeout)
            else:
                await self.pool.release(conn)
        except Exception as exc:
            log.warning("a connection failed its release and was closed", exc_info=exc)

    @contextlib.asynccontextmanager
    async def connection(self, context: Call) -> AsyncIterator[asyncpg.Connection]:
        """`acquire` and `release` around a block. A statement that finds
        the server read-only (25006: the primary was demoted, or an address
        now leads to a standby) drops the connection and every other one
        of the pool: they would all fail the same way, and new ones are
        made with target_session_attrs, which finds the writable server.
        The caller still gets the error (UNAVAILABLE, retryable)."""
        conn = await self.acquire(context)
        finished = False
        try:
            yield conn
            finished = True
        except asyncpg.ReadOnlySQLTransactionError:
            await left_the_primary(self.pool)
            raise
        finally:
            await self.release(conn, finished=finished)

    async def fetchrow(self, context: Call, query: str, *args: Any) -> asyncpg.Record | None:
        async with self.connection(context) as conn:
            return await conn.fetchrow(query, *args, timeout=self.query_timeout(context))

    async def fetch_by_id(
        self, context: Call, query: str, ident: int, not_found: Callable[[int], Exception]
    ) -> asyncpg.Record:
        """The row `query` finds for `ident`; `not_found(ident)` raised if none."""
        row = await self.fetchrow(context, query, ident)
        if row is None:
            raise not_found(ident)
        return row

    async def fetch(self, context: Call, query: str, *args: Any) -> list[asyncpg.Record]:
        async with self.connection(context) as conn:
            return await conn.fetch(query, *args, timeout=self.query_timeout(context))
