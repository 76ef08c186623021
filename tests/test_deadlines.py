"""The call's deadline bounds the database work; cancelled calls cancel their
query; an exhausted pool fails fast; every connection goes back to the pool."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import asyncpg
import grpc
import pytest

from orderstream.orders.v1 import order_pb2, order_service_pb2, order_service_pb2_grpc
from tests.support.apps import app_with_channel, pool_is_full
from tests.support.database import backends_running, row_locked
from tests.support.polling import eventually
from tests.support.requests import create_request
from tests.support.status import rpc_error

pytestmark = pytest.mark.through_pgbouncer

UPDATE_MARKER = "orders_update_status("
POOL_OF_ONE = {"ORDERSTREAM_POOL_MIN_SIZE": "1", "ORDERSTREAM_POOL_MAX_SIZE": "1"}


def pay(order_id: int) -> order_service_pb2.UpdateOrderStatusRequest:
    return order_service_pb2.UpdateOrderStatusRequest(
        id=order_id, status=order_pb2.ORDER_STATUS_PAID
    )


async def test_deadline_shorter_than_the_query_cancels_it(app, orders, admin_db):
    order = await orders.CreateOrder(create_request())
    async with row_locked(admin_db, order.id):
        error = await rpc_error(orders.UpdateOrderStatus(pay(order.id), timeout=0.5))
        assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED
        # Gone from the database while the lock is still held: cancelled, not
        # merely abandoned by the client.
        await eventually(
            lambda: _none_running(admin_db, UPDATE_MARKER), what="the statement to be cancelled"
        )
    unchanged = await orders.GetOrder(order_service_pb2.GetOrderRequest(id=order.id))
    assert unchanged.status == order_pb2.ORDER_STATUS_PENDING
    assert unchanged.version == 1
    await eventually(lambda: pool_is_full(app), what="the connection to return")
    paid = await orders.UpdateOrderStatus(pay(order.id), timeout=5)
    assert paid.version == 2


async def test_client_cancel_cancels_the_query(app, orders, admin_db):
    order = await orders.CreateOrder(create_request())
    async with row_locked(admin_db, order.id):
        call = orders.UpdateOrderStatus(pay(order.id))
        await eventually(lambda: _some_running(admin_db, UPDATE_MARKER), what="the update to block")
        call.cancel()
        await eventually(
            lambda: _none_running(admin_db, UPDATE_MARKER), what="the statement to be cancelled"
        )
    assert (await call.code()) == grpc.StatusCode.CANCELLED
    unchanged = await orders.GetOrder(order_service_pb2.GetOrderRequest(id=order.id))
    assert unchanged.version == 1
    await eventually(lambda: pool_is_full(app), what="the connection to return")


async def test_exhausted_pool_fails_fast_with_resource_exhausted(service_env, orders, admin_db):
    order = await orders.CreateOrder(create_request())
    async with app_with_channel(
        service_env, **POOL_OF_ONE, ORDERSTREAM_POOL_ACQUIRE_TIMEOUT="0.3"
    ) as (small, channel):
        stub = order_service_pb2_grpc.OrderServiceStub(channel)
        async with _update_blocked(admin_db, stub, order.id) as blocked:
            error = await rpc_error(stub.GetOrder(order_service_pb2.GetOrderRequest(id=order.id)))
            assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert error.error_info.reason == "POOL_EXHAUSTED"
            assert error.retry_info is not None
        assert (await blocked).status == order_pb2.ORDER_STATUS_PAID
        again = await stub.GetOrder(order_service_pb2.GetOrderRequest(id=order.id))
        assert again.version == 2
        await eventually(lambda: pool_is_full(small), what="the connection to return")


async def test_deadline_shorter_than_the_pool_wait_is_deadline_exceeded(
    service_env, orders, admin_db
):
    order = await orders.CreateOrder(create_request())
    async with app_with_channel(
        service_env, **POOL_OF_ONE, ORDERSTREAM_POOL_ACQUIRE_TIMEOUT="30"
    ) as (_, channel):
        stub = order_service_pb2_grpc.OrderServiceStub(channel)
        async with _update_blocked(admin_db, stub, order.id) as blocked:
            error = await rpc_error(
                stub.GetOrder(order_service_pb2.GetOrderRequest(id=order.id), timeout=0.3)
            )
            assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED
        await blocked


@contextlib.asynccontextmanager
async def _update_blocked(
    admin_db: asyncpg.Pool, stub: order_service_pb2_grpc.OrderServiceStub, order_id: int
) -> AsyncIterator[asyncio.Future[order_pb2.Order]]:
    """An update of the order in flight through `stub`, blocked on its row
    lock (and so holding its connection) until the block ends."""
    async with row_locked(admin_db, order_id):
        blocked = asyncio.ensure_future(stub.UpdateOrderStatus(pay(order_id)))
        await eventually(lambda: _some_running(admin_db, UPDATE_MARKER), what="the update to block")
        yield blocked


async def _some_running(db, fragment: str) -> bool:
    return await backends_running(db, fragment) > 0


async def _none_running(db, fragment: str) -> bool:
    return await backends_running(db, fragment) == 0
