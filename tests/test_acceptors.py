"""ORDERSTREAM_ACCEPTORS: one process serves through several grpc.aio
servers on one port (service/rpc/acceptors.py). Each listens on that port,
calls on many connections are all served across them, the limits stay the
process's, and a stop drains every one of them."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from orderstream.orders.v1 import order_service_pb2, order_service_pb2_grpc
from service.settings import Settings
from tests.support.apps import running_app
from tests.support.connections import create_on_own_connection, own_channel
from tests.support.status import rpc_error

ACCEPTORS = 4
CONNECTIONS = 24  # each its own: the kernel spreads them over the acceptors
_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp{,6}
NO_SUCH_ORDER = 2**62


def listening_sockets(port: int) -> int:
    """Sockets in LISTEN on `port`, from the kernel's own tables."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state == _LISTEN and int(local.rsplit(":", 1)[1], 16) == port:
                count += 1
    return count


async def test_every_acceptor_listens_on_the_one_port_and_serves(service_env):
    async with running_app(service_env, ORDERSTREAM_ACCEPTORS=str(ACCEPTORS)) as app:
        assert len(app.servers) == ACCEPTORS
        assert listening_sockets(app.port) == ACCEPTORS
        ids = await asyncio.gather(
            *(create_on_own_connection(app.port) for _ in range(CONNECTIONS))
        )
        assert len(set(ids)) == CONNECTIONS
    assert listening_sockets(app.port) == 0


async def test_the_call_limit_is_the_process_not_each_acceptor(service_env, admin_db):
    """ORDERSTREAM_MAX_CONCURRENT_RPCS counts the calls of every acceptor."""
    limit = 2
    async with (
        running_app(
            service_env,
            ORDERSTREAM_ACCEPTORS=str(ACCEPTORS),
            ORDERSTREAM_MAX_CONCURRENT_RPCS=str(limit),
        ) as app,
        admin_db.acquire() as holder,
    ):
        channels = [own_channel(app.port) for _ in range(CONNECTIONS)]
        try:
            async with holder.transaction():
                # Every GetOrder that gets in waits on this lock, in progress.
                await holder.execute("LOCK TABLE orders IN ACCESS EXCLUSIVE MODE")
                calls = [
                    asyncio.ensure_future(
                        rpc_error(
                            order_service_pb2_grpc.OrderServiceStub(c).GetOrder(
                                order_service_pb2.GetOrderRequest(id=NO_SUCH_ORDER), timeout=30
                            )
                        )
                    )
                    for c in channels
                ]
                refused = []
                while len(refused) < CONNECTIONS - limit:
                    done, _ = await asyncio.wait(calls, return_when=asyncio.FIRST_COMPLETED)
                    for call in done:
                        calls.remove(call)
                        refused.append(call.result())
                assert len(calls) == limit  # held in their statements
            assert {e.code for e in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
            assert {e.error_info.reason for e in refused if e.error_info} == {"TOO_MANY_RPCS"}
            # Let go, the two that got in finish on their own.
            assert {(await call).code for call in calls} == {grpc.StatusCode.NOT_FOUND}
        finally:
            await asyncio.gather(*(c.close() for c in channels))


def test_acceptors_are_bounded(service_env):
    assert Settings.from_env(service_env).acceptors == 32
    for bad in ("0", "257", "many"):
        with pytest.raises(ValueError, match="ORDERSTREAM_ACCEPTORS"):
            Settings.from_env({**service_env, "ORDERSTREAM_ACCEPTORS": bad})
