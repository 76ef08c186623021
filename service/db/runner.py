"""Statements for one call, within the call's deadline."""

from __future__ import annotations

import logging
from typing import Any

import asyncpg
import grpc

from service import errors
from service.db.pool import was_connecting
from service.errors import ServiceError

log = logging.getLogger(__name__)


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
        transaction_pooling: bool = False,
    ):
        self.pool = pool
        self._acquire_timeout = acquire_timeout
        self._command_timeout = command_timeout
        self._transaction_pooling = transaction_pooling

    def query_timeout(self, context: grpc.aio.ServicerContext) -> float:
        remaining = context.time_remaining()
        if remaining is None:
            return self._command_timeout
        if remaining <= 0:
            raise errors.deadline_exceeded()
        return min(remaining, self._command_timeout)

    async def acquire(self, context: grpc.aio.ServicerContext) -> asyncpg.Connection:
        """Takes a connection; the caller must hand it to `release`."""
        remaining = context.time_remaining()
        deadline_bound = remaining is not None and remaining < self._acquire_timeout
        wait = remaining if deadline_bound else self._acquire_timeout
        if wait is not None and wait <= 0:
            raise errors.deadline_exceeded()
        try:
            return await self.pool.acquire(timeout=wait)
        except TimeoutError:
            if deadline_bound:
                raise errors.deadline_exceeded() from None
            # Asked only after the timeout, so the hot path pays nothing for it.
            if was_connecting(self.pool):
                raise errors.unavailable(
                    f"the database did not accept a connection within {self._acquire_timeout:g}s"
                ) from None
            raise ServiceError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "POOL_EXHAUSTED",
                f"no database connection became free within {self._acquire_timeout:g}s",
                retry_after=self._acquire_timeout,
            ) from None

    async def release(self, conn: asyncpg.Connection) -> None:
        """Returns `conn` to the pool; never fails the call.

        asyncpg shields the release itself, so cancellation cannot leak it.
        A release fails only when the connection is beyond use: its reset
        failed (asyncpg then terminates it) or the server ended it while the
        release was under way (asyncpg already took it back: "release()
        called on a free connection holder", seen in the fault soak). Either
        way the pool is whole again, and the call's statements are done: a
        committed write must not be reported as failed because of it.
        """
        try:
            await self.pool.release(conn)
        except Exception as exc:
            log.warning("a connection failed its release and was closed", exc_info=exc)

    async def cursor(
        self, conn: asyncpg.Connection, context: grpc.aio.ServicerContext, query: str, *args: Any
    ) -> asyncpg.cursor.Cursor:
        """Opens a cursor in the transaction open on `conn`.

        `conn.cursor` prepares the query as a *named* statement even with the
        statement cache off, and closes it only later, on whatever server
        connection a transaction-pooling PgBouncer then hands out: the name
        stays behind on this one, where another process's asyncpg (whose
        names count from the same start) may prepare it again and fail.
        Behind such a PgBouncer (the cache is then off) `conn.prepare` makes
        the *unnamed* statement instead, parsed again with the portal's Bind:
        the portal lives until the transaction ends and nothing outlives it,
        so no other client's statements need dropping either."""
        timeout = self.query_timeout(context)
        if self._transaction_pooling:
            statement = await conn.prepare(query, timeout=timeout)
            return await statement.cursor(*args, timeout=self.query_timeout(context))
        return await conn.cursor(query, *args, timeout=timeout)

    async def fetchrow(
        self, context: grpc.aio.ServicerContext, query: str, *args: Any
    ) -> asyncpg.Record | None:
        conn = await self.acquire(context)
        try:
            return await conn.fetchrow(query, *args, timeout=self.query_timeout(context))
        finally:
            await self.release(conn)

    async def fetch(
        self, context: grpc.aio.ServicerContext, query: str, *args: Any
    ) -> list[asyncpg.Record]:
        conn = await self.acquire(context)
        try:
            return await conn.fetch(query, *args, timeout=self.query_timeout(context))
        finally:
            await self.release(conn)
