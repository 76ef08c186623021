"""Helpers for tests of a real `python -m service` process (shutdown,
workers): the login role it runs as, its environment, and what its
backends are doing. The process itself is devcluster.process's
`ServiceProcess`; the `migrated`, `admin` and `login` fixtures are in
tests/fixtures/fix_processes.py."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import grpc

from devcluster.process import ServiceProcess, process_env, service_process
from orderstream.orders.v1 import order_service_pb2, order_service_pb2_grpc
from tests.support.status import rpc_error

# `python -m service`'s exit code for a configuration or startup error.
EXIT_CONFIG = 2


@dataclass(frozen=True)
class Login:
    """A role of its own for the process under test, and its DATABASE_URL."""

    role: str
    url: str


async def backends_of(admin: asyncpg.Pool, role: str) -> int:
    return await admin.fetchval(
        """
        SELECT count(*) FROM pg_stat_activity
        WHERE usename = $1 AND application_name = 'orderstream'
        """,
        role,
    )


async def pool_closed(admin: asyncpg.Pool, role: str) -> bool:
    """No connection of `role`'s service is left in the database."""
    return await backends_of(admin, role) == 0


def serve_env(
    service_env: dict[str, str], login: Login, grace: int, event_loop: str | None
) -> dict[str, str]:
    return process_env(
        service_env,
        DATABASE_URL=login.url,
        ORDERSTREAM_MIGRATE_ON_START="false",
        ORDERSTREAM_SHUTDOWN_GRACE=str(grace),
        ORDERSTREAM_EVENT_LOOP=event_loop,  # None: the default (uvloop)
    )


@contextlib.asynccontextmanager
async def serving_process(
    env: dict[str, str],
) -> AsyncIterator[tuple[ServiceProcess, int, grpc.aio.Channel]]:
    """`python -m service serve` once it serves: the process, its port and
    a channel to it (closed before the process is ended)."""
    async with service_process(env, "serve") as child:
        port = (await child.record("serving"))["port"]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield child, port, channel


async def new_call_is_refused(port: int, order_id: int) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as fresh:
        stub = order_service_pb2_grpc.OrderServiceStub(fresh)
        error = await rpc_error(
            stub.GetOrder(order_service_pb2.GetOrderRequest(id=order_id), timeout=5)
        )
    assert error.code == grpc.StatusCode.UNAVAILABLE, error
