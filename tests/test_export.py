"""ExportOrders: one consistent snapshot, many orders per message."""

from __future__ import annotations

import tracemalloc

import grpc
import pytest

from orderstream.orders.v1 import order_pb2, order_service_pb2, order_service_pb2_grpc
from tests.support.apps import app_with_channel, pool_is_full
from tests.support.calls import export_all
from tests.support.polling import eventually
from tests.support.requests import create_request, unique
from tests.support.status import rpc_error

pytestmark = pytest.mark.through_pgbouncer


async def test_export_returns_every_matching_order_with_items(orders):
    customer = unique("cust")
    created = [await orders.CreateOrder(create_request(customer_id=customer)) for _ in range(12)]
    await orders.CreateOrder(create_request())  # another customer
    exported, _ = await export_all(
        orders, order_service_pb2.ExportOrdersRequest(customer_id=customer)
    )
    assert exported == created


async def test_export_filters_like_list(orders):
    customer = unique("cust")
    created = [await orders.CreateOrder(create_request(customer_id=customer)) for _ in range(4)]
    paid = await orders.UpdateOrderStatus(
        order_service_pb2.UpdateOrderStatusRequest(
            id=created[1].id, status=order_pb2.ORDER_STATUS_PAID
        )
    )
    exported, _ = await export_all(
        orders,
        order_service_pb2.ExportOrdersRequest(
            customer_id=customer, status=order_pb2.ORDER_STATUS_PAID
        ),
    )
    assert exported == [paid]
    later, _ = await export_all(
        orders,
        order_service_pb2.ExportOrdersRequest(
            customer_id=customer, created_after=created[2].create_time
        ),
    )
    assert [o.id for o in later] == [o.id for o in created[2:]]


async def test_export_reads_one_snapshot_while_orders_change(service_env, orders):
    customer = unique("cust")
    created = [await orders.CreateOrder(create_request(customer_id=customer)) for _ in range(60)]
    async with (
        app_with_channel(service_env, ORDERSTREAM_STREAM_BATCH_BYTES="1024") as (_, channel),
    ):
        stub = order_service_pb2_grpc.OrderServiceStub(channel)
        call = stub.ExportOrders(order_service_pb2.ExportOrdersRequest(customer_id=customer))
        exported = list((await call.read()).orders)
        assert 0 < len(exported) < 60
        # Change the rest, and add one, while the export is half way.
        last = created[-1]
        await orders.UpdateOrderStatus(
            order_service_pb2.UpdateOrderStatusRequest(
                id=last.id, status=order_pb2.ORDER_STATUS_CANCELLED
            )
        )
        await orders.CreateOrder(create_request(customer_id=customer))
        messages = 1
        while (response := await call.read()) is not grpc.aio.EOF:
            messages += 1
            exported.extend(response.orders)
    assert messages > 3
    assert exported == created, "the export must show the snapshot it started with"


async def test_export_rejects_invalid_filters(orders):
    error = await rpc_error(
        export_all(orders, order_service_pb2.ExportOrdersRequest(customer_id="x\x00"))
    )
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "customer_id" in error.violations


async def test_cancelled_export_returns_its_connection(app, orders, admin_db):
    customer = unique("cust")
    for _ in range(30):
        await orders.CreateOrder(create_request(customer_id=customer))
    call = orders.ExportOrders(order_service_pb2.ExportOrdersRequest(customer_id=customer))
    await call.read()
    call.cancel()
    await eventually(lambda: pool_is_full(app), what="the export's connection to return")
    await eventually(lambda: _nothing_left(admin_db), what="the export's transaction to end")


async def test_export_past_its_deadline_returns_its_connection(service_env, orders, admin_db):
    customer = unique("cust")
    for _ in range(40):
        await orders.CreateOrder(create_request(customer_id=customer))
    async with (
        app_with_channel(service_env, ORDERSTREAM_STREAM_BATCH_BYTES="1024") as (small, channel),
    ):
        stub = order_service_pb2_grpc.OrderServiceStub(channel)
        # A reader that stops after one message: the server waits in write()
        # holding its snapshot until the deadline ends the call.
        call = stub.ExportOrders(
            order_service_pb2.ExportOrdersRequest(customer_id=customer), timeout=1.0
        )
        await call.read()
        assert await call.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await eventually(lambda: pool_is_full(small), what="the export's connection to return")
    await eventually(lambda: _nothing_left(admin_db), what="the export's transaction to end")


async def _nothing_left(admin_db) -> bool:
    """No service backend still in a transaction or running the export."""
    return (
        await admin_db.fetchval(
            """
            SELECT count(*) FROM pg_stat_activity
            WHERE application_name = 'orderstream'
              AND (state LIKE 'idle in transaction%'
                   OR (state = 'active' AND query LIKE '%FROM orders o%'))
            """
        )
        == 0
    )


async def test_large_orders_are_read_in_pages_bounded_in_bytes(app, orders, admin_db):
    """Orders of 1,000 items: the export reads them about 1 MiB at a time.
    A fetch of 2,000 rows, as a cursor made, held all 300 at once (42 MiB
    of rows measured here before the change; about 3 MiB after)."""
    customer = unique("cust-large")
    await admin_db.execute(
        """
        WITH new_orders AS (
            INSERT INTO orders (customer_id, currency, total_cents)
            SELECT $1, 'EUR', 1000 FROM generate_series(1, 300)
            RETURNING id
        )
        INSERT INTO order_items (order_id, line_no, sku, quantity, unit_price_cents)
        SELECT id, line_no, repeat('s', 60) || line_no, 1, 1
        FROM new_orders, generate_series(1, 1000) AS line_no
        """,
        customer,
    )
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        exported, _ = await export_all(
            orders, order_service_pb2.ExportOrdersRequest(customer_id=customer)
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(exported) == 300 and all(len(order.items) == 1000 for order in exported)
    # Python objects only: the rows of a page or two (the messages, built by
    # protobuf's C runtime, are not counted).
    assert peak - before < 16 << 20, f"{(peak - before) >> 20} MiB at the peak"
