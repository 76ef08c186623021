"""SIGTERM on a real `python -m service` process: health goes NOT_SERVING at
once, new calls are refused, an in-flight write still completes and is
committed, the pool is closed, the process exits 0; a call still blocked
when the grace runs out is cancelled and leaves nothing behind."""

from __future__ import annotations

import asyncio
import signal
import time

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from orderstream.orders.v1 import order_pb2, order_service_pb2, order_service_pb2_grpc
from tests.support.polling import eventually
from tests.support.processes import new_call_is_refused, pool_closed, serve_env, serving_process
from tests.support.requests import create_request

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
PROMPTLY = 2.0  # seconds


def pay(order_id: int) -> order_service_pb2.UpdateOrderStatusRequest:
    return order_service_pb2.UpdateOrderStatusRequest(
        id=order_id, status=order_pb2.ORDER_STATUS_PAID
    )


async def blocked_behind(admin: asyncpg.Pool, role: str, holder_pid: int) -> bool:
    """A backend of `role` is waiting for a lock that `holder_pid` holds."""
    return bool(
        await admin.fetchval(
            """
            SELECT count(*) FROM pg_stat_activity
            WHERE usename = $1 AND application_name = 'orderstream'
              AND wait_event_type = 'Lock' AND $2 = ANY (pg_blocking_pids(pid))
            """,
            role,
            holder_pid,
        )
    )


@pytest.mark.parametrize("event_loop", [None, "asyncio"], ids=["uvloop-default", "asyncio"])
async def test_sigterm_drains_in_flight_write_then_exits(
    event_loop, service_env, login, admin, pg_cluster
):
    env = serve_env(service_env, login, grace=10, event_loop=event_loop)
    async with serving_process(env) as (child, port, channel):
        orders = order_service_pb2_grpc.OrderServiceStub(channel)
        order = await orders.CreateOrder(create_request(), timeout=5)

        async with admin.acquire() as holder:
            lock = holder.transaction()
            await lock.start()
            try:
                await holder.execute("SELECT 1 FROM orders WHERE id = $1 FOR UPDATE", order.id)
                in_flight = asyncio.ensure_future(orders.UpdateOrderStatus(pay(order.id)))
                await eventually(
                    lambda: blocked_behind(admin, login.role, holder.get_server_pid()),
                    what="the update to wait on the row lock",
                )
                watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
                assert (await watch.read()).status == SERVING

                child.process.send_signal(signal.SIGTERM)
                signalled = time.monotonic()
                update = await asyncio.wait_for(watch.read(), PROMPTLY)
                assert update.status == NOT_SERVING
                await new_call_is_refused(port, order.id)
                # Still draining: the update waits, the process lives.
                assert not in_flight.done()
                assert child.process.returncode is None
                assert await blocked_behind(admin, login.role, holder.get_server_pid())
            finally:
                await lock.rollback()

        paid = await asyncio.wait_for(in_flight, 5)
        assert paid.status == order_pb2.ORDER_STATUS_PAID
        assert paid.version == 2
        # The Watch stays open, as a client's health checking keeps it:
        # it must not hold the process for the rest of the grace.
        assert await child.exit_code(timeout=10) == 0, child.output
        exited_after = time.monotonic() - signalled
        assert await watch.code() == grpc.StatusCode.OK
    assert exited_after < 5, "the drain waited for more than the in-flight call"
    assert (await child.record("stopped"))["level"] == "INFO"

    row = await admin.fetchrow("SELECT status, version FROM orders WHERE id = $1", order.id)
    assert (row["status"], row["version"]) == ("PAID", 2)
    await eventually(lambda: pool_closed(admin, login.role), what="the process's pool to close")


async def test_call_still_blocked_after_the_grace_is_cancelled(
    service_env, login, admin, pg_cluster
):
    env = serve_env(service_env, login, grace=1, event_loop=None)
    async with serving_process(env) as (child, _, channel):
        orders = order_service_pb2_grpc.OrderServiceStub(channel)
        order = await orders.CreateOrder(create_request(), timeout=5)

        async with admin.acquire() as holder, holder.transaction():
            await holder.execute("SELECT 1 FROM orders WHERE id = $1 FOR UPDATE", order.id)
            in_flight = orders.UpdateOrderStatus(pay(order.id))
            await eventually(
                lambda: blocked_behind(admin, login.role, holder.get_server_pid()),
                what="the update to wait on the row lock",
            )
            child.process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            # The lock is never released while the process runs.
            assert await child.exit_code(timeout=5) == 0, child.output
            exited_after = time.monotonic() - signalled
            # Retryable elsewhere: another replica can take it.
            assert (await in_flight.code()) == grpc.StatusCode.UNAVAILABLE
            # Nothing of the process is left in the database while the
            # lock is still held, so the update cannot go through later.
            await eventually(
                lambda: pool_closed(admin, login.role),
                what="the process's backends to go",
            )
    assert 1 <= exited_after < 5
    row = await admin.fetchrow("SELECT status, version FROM orders WHERE id = $1", order.id)
    assert (row["status"], row["version"]) == ("PENDING", 1)
