"""Standard grpc.health.v1 status that follows the database.

SERVING while a pooled connection answers from a writable server,
NOT_SERVING while none does, and NOT_SERVING for good once shutdown begins.
A server in recovery (a standby, reached through an address not yet
re-pointed after a failover) or made read-only answers but cannot take a
write: the check reports NOT_SERVING and drops the pool's connections, so
the next ones look for the writable server again (target_session_attrs).

A check that cannot even get a pooled connection in time because every
connection is in use says nothing about the database (the pool is just
busy), so it leaves the status as it was; one that could have opened a
connection and did not in time, or whose connection cannot be returned,
found the database not answering.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable

import asyncpg
import grpc
from grpc_health.v1 import health, health_pb2

from service.db.pool import DATABASE_FAILURES, left_the_primary, was_connecting
from service.errors import Reason, ServiceError
from service.rpc.status_map import abort

log = logging.getLogger(__name__)


# A standby's sessions are read-only too, but pg_is_in_recovery() names the
# failover case outright; transaction_read_only also catches a primary
# fenced with default_transaction_read_only.
READ_ONLY = "SELECT pg_is_in_recovery() OR current_setting('transaction_read_only')::boolean"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class DatabaseHealth:
    def __init__(
        self,
        servicer: health.aio.HealthServicer,
        pool: asyncpg.Pool,
        service_names: Iterable[str],
        *,
        interval: float,
        timeout: float,
    ) -> None:
        self._servicer = servicer
        self._pool = pool
        self._names = ("", *service_names)  # "" is the whole server
        self._interval = interval
        self._timeout = timeout
        self._serving: bool | None = None
        self._stopped = asyncio.Event()

    async def _report(self, serving: bool) -> None:
        if serving == self._serving:
            return
        self._serving = serving
        if serving:
            log.info("database reachable: SERVING")
        else:
            log.warning("database unreachable: NOT_SERVING")
        for name in self._names:
            await self._servicer.set(name, SERVING if serving else NOT_SERVING)

    async def _database_answers(self) -> bool | None:
        pool = self._pool
        try:
            conn = await pool.acquire(timeout=self._timeout)
        except TimeoutError:
            return False if was_connecting(pool) else None
        except DATABASE_FAILURES:
            return False
        try:
            writable = not await conn.fetchval(READ_ONLY, timeout=self._timeout)
        except DATABASE_FAILURES:
            writable = False
        else:
            if not writable:
                await left_the_primary(pool)
        finally:
            released = await self._released(conn)
        return writable and released

    async def _released(self, conn: asyncpg.Connection) -> bool:
        """Returns the check's connection. On a stalled network the check's
        timeout leaves a cancellation nobody can confirm, and the release
        itself times out (the pool then terminates the connection): that
        is the database not answering, not a reason to stop checking."""
        try:
            await self._pool.release(conn, timeout=self._timeout)
        except DATABASE_FAILURES:
            return False
        return True

    async def run(self) -> None:
        """Checks every interval until `stop`; the first check is immediate."""
        while not self._stopped.is_set():
            try:
                answer = await self._database_answers()
            except Exception:
                # Whatever a broken connection throws, the watcher must
                # live on: a dead watcher would freeze the status.
                log.exception("database health check failed")
                answer = False
            if answer is not None and not self._stopped.is_set():
                await self._report(answer)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopped.wait(), self._interval)

    async def stop(self) -> None:
        """Flips every service to NOT_SERVING for good (shutdown has begun)."""
        self._stopped.set()
        await self._servicer.enter_graceful_shutdown()


class _SentStatus:
    """Stands in for a Watch call's context and remembers the last status sent."""

    def __init__(self, context: grpc.aio.ServicerContext) -> None:
        self._context = context
        self.status: int | None = None
        self.changed = asyncio.Event()

    async def write(self, response: health_pb2.HealthCheckResponse) -> None:
        await self._context.write(response)
        self.status = response.status
        self.changed.set()


class HealthServicer(health.aio.HealthServicer):
    """grpc's servicer, except that a Watch stream ends once shutdown has begun
    and it has sent NOT_SERVING. grpc's own never ends, so one open Watch (gRPC
    client-side health checking keeps one per channel) would hold every
    shutdown for the whole grace period.

    And Watch streams are bounded (`max_watches`, across every listener
    this servicer is on): health needs no token, and each open Watch holds
    memory for as long as its caller likes (20,000 on one connection took
    the process from 56 to 592 MiB)."""

    def __init__(self, max_watches: int, refused: Callable[[str], None]) -> None:
        """`refused` counts a Watch refused over the bound (the refusal metric:
        health runs outside the Observer that counts the services' own)."""
        super().__init__()
        self._shutting_down = asyncio.Event()
        self._max_watches = max_watches
        self._refused = refused
        self._watches = 0

    async def enter_graceful_shutdown(self) -> None:
        await super().enter_graceful_shutdown()
        self._shutting_down.set()

    async def _told_shutdown(self, sent: _SentStatus) -> None:
        await self._shutting_down.wait()
        while sent.status in (None, health_pb2.HealthCheckResponse.SERVING):
            sent.changed.clear()
            await sent.changed.wait()

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> None:
        if self._watches >= self._max_watches:
            self._refused(Reason.TOO_MANY_HEALTH_WATCHES)
            await abort(context, _too_many_watches(self._max_watches))
            return
        self._watches += 1
        sent = _SentStatus(context)
        watching = asyncio.ensure_future(super().Watch(request, sent))
        told = asyncio.ensure_future(self._told_shutdown(sent))
        try:
            await asyncio.wait((watching, told), return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._watches -= 1
            watching.cancel()
            told.cancel()
        if watching.done() and not watching.cancelled():
            watching.result()  # a failed write ends the call with its error


def _too_many_watches(limit: int) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        Reason.TOO_MANY_HEALTH_WATCHES,
        f"this server already serves {limit} health Watch streams "
        "(ORDERSTREAM_MAX_HEALTH_WATCHES); use Check, or retry later",
        retry_after=1.0,
        metadata={"limit": str(limit)},
    )
