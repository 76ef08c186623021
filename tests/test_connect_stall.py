"""A pool with room for a connection that cannot open one within the
acquire timeout has found the database not answering: UNAVAILABLE, which
callers retry, not RESOURCE_EXHAUSTED, which says the service is busy."""

from __future__ import annotations

import grpc

from orderstream.orders.v1 import order_service_pb2, order_service_pb2_grpc
from tests.support.apps import app_with_channel
from tests.support.database import through_proxy
from tests.support.polling import eventually
from tests.support.requests import create_request
from tests.support.status import rpc_error
from tests.support.tcp_proxy import TcpProxy


async def test_a_connection_that_cannot_open_is_unavailable(pg_cluster, service_env, orders):
    order = await orders.CreateOrder(create_request())
    async with (
        TcpProxy(pg_cluster.port) as proxy,
        app_with_channel(
            service_env,
            DATABASE_URL=through_proxy(pg_cluster, proxy.port).dsn(),
            ORDERSTREAM_POOL_MIN_SIZE="0",
            ORDERSTREAM_POOL_MAX_SIZE="2",
            ORDERSTREAM_POOL_ACQUIRE_TIMEOUT="0.5",
        ) as (app, channel),
    ):
        stub = order_service_pb2_grpc.OrderServiceStub(channel)
        get = order_service_pb2.GetOrderRequest(id=order.id)
        # No connection left in the pool, and none can be opened: the
        # proxy accepts, then drops every byte (a stalled network). In that
        # order, so that the service's own background reads (the health
        # check, the consumers' lag) cannot open a new one meanwhile.
        proxy.blackhole()
        proxy.cut()
        await eventually(
            lambda: _no_connections(app), what="the pool to notice its connections are gone"
        )
        error = await rpc_error(stub.GetOrder(get, timeout=10))
        assert error.code == grpc.StatusCode.UNAVAILABLE
        assert error.error_info.reason == "DATABASE_UNAVAILABLE"
        assert "did not accept a connection within 0.5s" in error.message
        assert error.retry_info is not None

        proxy.resume()
        assert (await stub.GetOrder(get, timeout=10)).id == order.id


async def _no_connections(app) -> bool:
    return app.pool.get_size() == 0
