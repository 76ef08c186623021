"""Builds, starts and stops one orderstream server process.

`App.start` opens the pool (verifying the database's certificate), applies
migrations, binds the port (0 picks a free one, which tests rely on) and
starts serving; `App.stop` is the graceful shutdown SIGTERM triggers.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from dataclasses import dataclass

import asyncpg
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from orderstream.events.v1 import event_service_pb2, event_service_pb2_grpc
from orderstream.orders.v1 import order_service_pb2, order_service_pb2_grpc
from service.call import Database
from service.database import StartupError, close_pool, connect_direct, open_pool
from service.event_service import EventService
from service.feed import EventFeed
from service.health import DatabaseHealth
from service.migrate import migrate
from service.order_service import OrderService
from service.page_token import PageTokens
from service.settings import Settings
from service.streams import StreamSlots

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    order_service_pb2.DESCRIPTOR.services_by_name["OrderService"].full_name,
    event_service_pb2.DESCRIPTOR.services_by_name["EventService"].full_name,
)


def _page_tokens(settings: Settings) -> PageTokens:
    if settings.page_token_key is not None:
        return PageTokens(settings.page_token_key.reveal().encode())
    log.warning(
        "ORDERSTREAM_PAGE_TOKEN_KEY is not set: using a random key, so page tokens "
        "will not work across replicas or restarts"
    )
    return PageTokens(secrets.token_bytes(32))


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


class _HealthServicer(health.aio.HealthServicer):
    """grpc's servicer, except that a Watch stream ends once shutdown has begun
    and it has sent NOT_SERVING. grpc's own never ends, so one open Watch (gRPC
    client-side health checking keeps one per channel) would hold every
    shutdown for the whole grace period."""

    def __init__(self) -> None:
        super().__init__()
        self._shutting_down = asyncio.Event()

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
        sent = _SentStatus(context)
        watching = asyncio.ensure_future(super().Watch(request, sent))
        told = asyncio.ensure_future(self._told_shutdown(sent))
        try:
            await asyncio.wait((watching, told), return_when=asyncio.FIRST_COMPLETED)
        finally:
            watching.cancel()
            told.cancel()
        if watching.done() and not watching.cancelled():
            watching.result()  # a failed write ends the call with its error


@dataclass
class App:
    settings: Settings
    pool: asyncpg.Pool
    server: grpc.aio.Server
    health: DatabaseHealth
    feed: EventFeed
    followers: StreamSlots
    port: int
    _health_task: asyncio.Task[None]

    @classmethod
    async def start(cls, settings: Settings) -> App:
        pool = await open_pool(settings)
        try:
            if settings.migrate_on_start:
                async with pool.acquire(timeout=settings.pool_acquire_timeout) as conn:
                    await migrate(conn)
            return await cls._serve(settings, pool)
        except BaseException:
            await close_pool(pool, settings.shutdown_grace)
            raise

    @classmethod
    async def _serve(cls, settings: Settings, pool: asyncpg.Pool) -> App:
        # A second server on a taken port must fail, not silently share it.
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        db = Database(
            pool,
            acquire_timeout=settings.pool_acquire_timeout,
            command_timeout=settings.command_timeout,
        )
        feed = EventFeed(
            lambda: connect_direct(settings), poll_interval=settings.follow_poll_interval
        )
        streams = StreamSlots(settings.max_streams, "stream")
        followers = StreamSlots(settings.max_followers, "follower")
        order_service_pb2_grpc.add_OrderServiceServicer_to_server(
            OrderService(db, _page_tokens(settings), streams=streams, feed=feed, settings=settings),
            server,
        )
        event_service_pb2_grpc.add_EventServiceServicer_to_server(
            EventService(
                db,
                streams=streams,
                followers=followers,
                feed=feed,
                settings=settings,
            ),
            server,
        )
        health_servicer = _HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        address = f"{settings.host}:{settings.port}"
        try:
            port = server.add_insecure_port(address)
        except RuntimeError:
            port = 0
        if port == 0:
            raise StartupError(f"cannot listen on {address}: address in use or unavailable")
        database_health = DatabaseHealth(
            health_servicer,
            pool,
            SERVICE_NAMES,
            interval=settings.health_check_interval,
            timeout=min(settings.pool_acquire_timeout, settings.health_check_interval),
        )
        await server.start()
        await feed.start()
        task = asyncio.create_task(database_health.run(), name="database-health")
        return cls(settings, pool, server, database_health, feed, followers, port, task)

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING at once, refuse new calls, let in-flight calls finish
        within the grace, then close the pool."""
        grace = self.settings.shutdown_grace if grace is None else grace
        # Queued before health.stop() wakes the Watch streams, so the server
        # refuses new calls before any client can see NOT_SERVING.
        stopping = asyncio.ensure_future(self.server.stop(grace))
        await self.health.stop()
        # Follow streams never finish by themselves: end them while it drains.
        await self.feed.close()
        await stopping
        await self._health_task
        await close_pool(self.pool, timeout=grace)
