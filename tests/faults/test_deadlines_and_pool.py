"""Scenario 6: a deadline shorter than a slow statement. Scenario 7: pool
exhaustion. Both through the proxy to the fault cluster, with the suite's
invariants applied (tests/test_deadlines.py covers the same paths on the
shared cluster)."""

from __future__ import annotations

import asyncio

import asyncpg
import grpc

from orderstream.orders.v1 import order_pb2, order_service_pb2, order_service_pb2_grpc
from tests.faults.invariants import pool_at_baseline
from tests.faults.ledger import order_request
from tests.faults.service import CHANNEL_OPTIONS, Target
from tests.support.apps import running_app
from tests.support.polling import eventually
from tests.support.requests import unique
from tests.support.status import rpc_error


async def _backend(admin, pid: int) -> asyncpg.Record | None:
    rows = await admin.fetch("SELECT state, query_start FROM pg_stat_activity WHERE pid = $1", pid)
    return rows[0] if rows else None


async def test_deadline_shorter_than_a_slow_statement(scenario, service, admin, orders):
    # A create that waits in its commit is the slow statement here.
    key = unique("slow")
    request = order_request(key, customer_id=f"gate:{key}")
    async with admin.gate(request.customer_id):
        creating = asyncio.ensure_future(scenario.ledger.create_order(orders, request, timeout=5))
        await eventually(admin.waiting_at_gate, what="the create to wait in its commit")
        [pid] = await admin.waiting_at_gate()
        async with asyncio.timeout(30):
            assert await creating == grpc.StatusCode.DEADLINE_EXCEEDED

        # Cancelled in PostgreSQL while the gate is still closed (not just
        # abandoned by the caller), on a connection that stays open: the
        # backend is still there, idle, out of its transaction.
        async def statement_gone() -> bool:
            backend = await _backend(admin, pid)
            assert backend is not None, "the connection was closed, not kept"
            return bool(backend["state"] == "idle")

        await eventually(statement_gone, what="the statement to be cancelled")
    # Back in the pool (its reset on release done), before it is looked at.
    await eventually(lambda: pool_at_baseline(service.target), what="the pool's baseline")
    cancelled = await _backend(admin, pid)
    assert cancelled is not None, "the connection was closed, not kept"
    # Rolled back, not committed behind the caller's back.
    assert await admin.fetchval("SELECT count(*) FROM orders WHERE request_id = $1", key) == 0
    # The connection that ran it is reused: the pool hands out the connection
    # released last first (asyncpg's pool is a LIFO queue).
    for _ in range(10):
        assert (
            await scenario.ledger.create_order(orders, order_request(unique("next")), timeout=10)
            == grpc.StatusCode.OK
        )
    reused = await _backend(admin, pid)
    assert reused is not None, "the connection was dropped after its statement was cancelled"
    assert reused["query_start"] > cancelled["query_start"], "the connection was never used again"


async def test_pool_exhaustion_fails_fast_and_recovers(scenario, admin, fault_env):
    async with (
        running_app(
            fault_env,
            ORDERSTREAM_POOL_MIN_SIZE="1",
            ORDERSTREAM_POOL_MAX_SIZE="1",
            ORDERSTREAM_POOL_ACQUIRE_TIMEOUT="0.5",
        ) as small,
        grpc.aio.insecure_channel(f"127.0.0.1:{small.port}", options=CHANNEL_OPTIONS) as channel,
    ):
        assert small.metrics_port is not None
        target = Target(small.port, small.metrics_port)
        stub = order_service_pb2_grpc.OrderServiceStub(channel)
        key = unique("holds-the-pool")
        holder = order_request(key, customer_id=f"gate:{key}")
        async with admin.gate(holder.customer_id):
            holding = asyncio.ensure_future(scenario.ledger.create_order(stub, holder, timeout=60))
            await eventually(admin.waiting_at_gate, what="the only connection to be busy")
            async with asyncio.timeout(10):  # fails after the 0.5 s acquire timeout, not later
                error = await rpc_error(stub.GetOrder(order_service_pb2.GetOrderRequest(id=1)))
                refused = await scenario.ledger.create_order(
                    stub, order_request(unique("refused")), timeout=30
                )
            assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert error.error_info.reason == "POOL_EXHAUSTED"
            assert refused == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert await holding == grpc.StatusCode.OK
        after = await scenario.ledger.create_order(stub, order_request(unique("after")), timeout=10)
        assert after == grpc.StatusCode.OK
        created = await stub.GetOrder(
            order_service_pb2.GetOrderRequest(id=scenario.ledger.writes[-1].answer.id)
        )
        assert created.status == order_pb2.ORDER_STATUS_PENDING
        await eventually(lambda: pool_at_baseline(target), what="the small pool's baseline")
