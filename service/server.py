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
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from orderstream.events.v1 import event_service_pb2, event_service_pb2_grpc
from orderstream.orders.v1 import order_service_pb2, order_service_pb2_grpc
from service.call import Database
from service.database import StartupError, close_pool, open_pool
from service.event_service import EventService
from service.health import DatabaseHealth
from service.migrate import migrate
from service.order_service import OrderService
from service.page_token import PageTokens
from service.settings import Settings

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


@dataclass
class App:
    settings: Settings
    pool: asyncpg.Pool
    server: grpc.aio.Server
    health: DatabaseHealth
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
        order_service_pb2_grpc.add_OrderServiceServicer_to_server(
            OrderService(db, _page_tokens(settings)), server
        )
        event_service_pb2_grpc.add_EventServiceServicer_to_server(EventService(db), server)
        health_servicer = health.aio.HealthServicer()
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
        task = asyncio.create_task(database_health.run(), name="database-health")
        return cls(settings, pool, server, database_health, port, task)

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING at once, refuse new calls, let in-flight calls finish
        within the grace, then close the pool."""
        grace = self.settings.shutdown_grace if grace is None else grace
        await self.health.stop()
        await self.server.stop(grace)
        await self._health_task
        await close_pool(self.pool, timeout=grace)
