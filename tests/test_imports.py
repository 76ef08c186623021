"""ImportOrders over a real channel: client-streamed orders staged through
COPY and moved into the order tables, each with its order.created event.
What imports share with uploads (the import_id, all or nothing, the stream
limit) is in tests/test_loads.py."""

from __future__ import annotations

import json

import grpc
import pytest

from orderstream.orders.v1 import order_pb2, order_service_pb2
from tests.support.apps import app_with_channel, pool_is_full
from tests.support.loaders import IMPORT, Item, in_messages
from tests.support.polling import eventually
from tests.support.requests import order, unique
from tests.support.status import rpc_error

pytestmark = pytest.mark.through_pgbouncer


async def orders_of(admin_db, customer_id: str) -> list:
    return await admin_db.fetch(
        "SELECT * FROM orders WHERE customer_id = $1 ORDER BY id", customer_id
    )


async def test_multi_message_import_round_trips(channel, orders, admin_db):
    customer = unique("cust")
    batches = [
        [
            order(
                customer_id=customer,
                currency=("EUR", "USD", "CHF")[m],
                items=[
                    Item(sku=f"SKU-{m}-{n}-{k}", quantity=k + 1, unit_price_cents=100 * n + k)
                    for k in range(n + 1)
                ],
                # Output-only fields are ignored.
                id=999,
                status=order_pb2.ORDER_STATUS_SHIPPED,
                total_cents=1,
                version=7,
            )
            for n in range(size)
        ]
        for m, size in enumerate((4, 1, 3))
    ]
    response = await IMPORT.load(channel, IMPORT.messages(unique("import"), batches))

    assert response.order_count == 8
    rows = await orders_of(admin_db, customer)
    assert [r["id"] for r in rows] == sorted(r["id"] for r in rows)
    sent = [o for batch in batches for o in batch]
    for row, original in zip(rows, sent, strict=True):
        got = await orders.GetOrder(order_service_pb2.GetOrderRequest(id=row["id"]))
        assert got.currency == original.currency
        assert list(got.items) == list(original.items)  # items in the order given
        assert got.total_cents == sum(i.quantity * i.unit_price_cents for i in original.items)
        assert got.status == order_pb2.ORDER_STATUS_PENDING
        assert got.version == 1
        assert row["request_id"] is None
        assert row["request_hash"] is None

    # One order.created event per order, shaped like CreateOrder's, in order id order.
    written = await admin_db.fetch(
        "SELECT id, type, source, subject, time, payload::text AS payload FROM events "
        "WHERE subject = ANY($1::text[]) ORDER BY id",
        [f"orders/{r['id']}" for r in rows],
    )
    assert [e["subject"] for e in written] == [f"orders/{r['id']}" for r in rows]
    for event, row in zip(written, rows, strict=True):
        assert (event["type"], event["source"]) == ("order.created", "orderstream")
        assert event["time"] == row["create_time"]
        assert json.loads(event["payload"]) == {
            "order_id": row["id"],
            "customer_id": customer,
            "currency": row["currency"],
            "total_cents": row["total_cents"],
            "status": "PENDING",
        }


async def test_imported_event_matches_create_order_event(channel, orders, admin_db):
    """Same payload keys and value types as CreateOrder's order.created."""
    customer = unique("cust")
    created = await orders.CreateOrder(
        order_service_pb2.CreateOrderRequest(
            request_id=unique("req"),
            customer_id=customer,
            currency="EUR",
            items=[Item(sku="A", quantity=1, unit_price_cents=5)],
        )
    )
    imported = await IMPORT.load(
        channel,
        IMPORT.messages(
            unique("import"),
            [[order(customer_id=customer, items=[Item(sku="A", quantity=1, unit_price_cents=5)])]],
        ),
    )
    payloads = [
        json.loads(
            await admin_db.fetchval(
                "SELECT payload::text FROM events WHERE subject = $1", f"orders/{ident}"
            )
        )
        for ident in (created.id, imported.first_order_id)
    ]
    assert {k: v for k, v in payloads[0].items() if k != "order_id"} == {
        k: v for k, v in payloads[1].items() if k != "order_id"
    }


async def test_sequential_imports_on_one_connection(service_env, admin_db):
    """The staging table is dropped at each commit and created anew."""
    async with app_with_channel(
        service_env, ORDERSTREAM_POOL_MIN_SIZE="1", ORDERSTREAM_POOL_MAX_SIZE="1"
    ) as (_, channel):
        for size in (3, 1, 2):
            response = await IMPORT.load(
                channel, IMPORT.messages(unique("import"), [[order()] * size])
            )
            assert response.order_count == size
        bad = await rpc_error(
            IMPORT.load(
                channel, IMPORT.messages(unique("import"), [[order(), order(currency="x")]])
            )
        )
        assert bad.code == grpc.StatusCode.INVALID_ARGUMENT
        assert (
            await IMPORT.load(channel, IMPORT.messages(unique("import"), [[order()]]))
        ).order_count == 1


async def test_larger_import_in_many_messages(channel, admin_db, app):
    customer = unique("cust-large")
    count = 20_000
    batches = in_messages(
        count,
        500,
        lambda n: order(
            customer_id=customer,
            items=[Item(sku=f"SKU-{k}", quantity=k + 1, unit_price_cents=n) for k in range(3)],
        ),
    )
    response = await IMPORT.load(channel, IMPORT.messages(unique("import"), batches))

    assert response.order_count == count
    summary = await admin_db.fetchrow(
        """
        SELECT count(*) AS orders, min(o.id) AS first, max(o.id) AS last,
               sum(o.total_cents) AS total,
               (SELECT count(*) FROM order_items i JOIN orders x ON x.id = i.order_id
                WHERE x.customer_id = $1) AS items,
               (SELECT count(*) FROM events e JOIN orders x ON e.subject = 'orders/' || x.id
                WHERE x.customer_id = $1) AS events
        FROM orders o WHERE o.customer_id = $1
        """,
        customer,
    )
    assert dict(summary) == {
        "orders": count,
        "first": response.first_order_id,
        "last": response.last_order_id,
        "total": sum(6 * p for p in range(count)),
        "items": 3 * count,
        "events": count,
    }
    await eventually(lambda: pool_is_full(app), what="the connection to return")
