"""ImportOrders over a real channel: client-streamed orders staged through
COPY and moved all or nothing, each with its order.created event, idempotent
on import_id, within the stream limits."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

import grpc
import pytest

from orderstream.orders.v1 import order_pb2, order_service_pb2, order_service_pb2_grpc
from tests.support.apps import pool_is_full, running_app
from tests.support.database import nothing_left_running, rows_copied, table_counts, waiting_on_lock
from tests.support.polling import eventually
from tests.support.requests import order, stream, unique
from tests.support.status import rpc_error

pytestmark = pytest.mark.through_pgbouncer

Request = order_service_pb2.ImportOrdersRequest
Item = order_pb2.LineItem


def messages(import_id: str, batches: Iterable[Sequence[order_pb2.Order]]) -> list[Request]:
    """One request per batch; only the first carries the import_id."""
    return [
        Request(import_id=import_id if n == 0 else "", orders=batch)
        for n, batch in enumerate(batches)
    ]


async def run_import(orders, requests: Iterable[Request], **kwargs: object):
    return await orders.ImportOrders(stream(requests), **kwargs)


async def stored_import(admin_db, import_id: str):
    return await admin_db.fetchrow("SELECT * FROM imports WHERE import_id = $1", import_id)


async def orders_of(admin_db, customer_id: str) -> list:
    return await admin_db.fetch(
        "SELECT * FROM orders WHERE customer_id = $1 ORDER BY id", customer_id
    )


async def _copy_running(admin_db) -> bool:
    return (
        await admin_db.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'orderstream' "
            "AND state = 'active' AND query LIKE 'COPY%'"
        )
        > 0
    )


async def _some_rows_copied(admin_db) -> bool:
    return await rows_copied(admin_db) > 0


async def test_multi_message_import_round_trips(orders, admin_db):
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
    import_id = unique("import")
    response = await run_import(orders, messages(import_id, batches))

    assert response.order_count == 8
    rows = await orders_of(admin_db, customer)
    assert [r["id"] for r in rows] == sorted(r["id"] for r in rows)
    assert (response.first_order_id, response.last_order_id) == (rows[0]["id"], rows[-1]["id"])
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
    stored = await stored_import(admin_db, import_id)
    assert (stored["order_count"], stored["first_order_id"], stored["last_order_id"]) == (
        8,
        response.first_order_id,
        response.last_order_id,
    )


async def test_imported_event_matches_create_order_event(orders, admin_db):
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
    imported = await run_import(
        orders,
        messages(
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


async def test_import_of_no_orders_is_recorded(orders, admin_db):
    import_id = unique("import")
    before = await table_counts(admin_db)
    response = await run_import(orders, [Request(import_id=import_id), Request()])
    assert response == order_service_pb2.ImportOrdersResponse()
    assert await table_counts(admin_db) == before
    assert (await stored_import(admin_db, import_id))["order_count"] == 0


BAD_ORDERS = [
    ({"customer_id": ""}, "customer_id"),
    ({"customer_id": "c\x00"}, "customer_id"),
    ({"customer_id": "c" * 129}, "customer_id"),
    ({"currency": "eur"}, "currency"),
    ({"currency": "EURO"}, "currency"),
    ({"items": []}, "items"),
    ({"items": [Item(sku="A", quantity=1, unit_price_cents=1)] * 1001}, "items"),
    (
        {"items": [Item(sku="A", quantity=1, unit_price_cents=1), Item(sku="", quantity=1)]},
        "items[1].sku",
    ),
    (
        {"items": [Item(sku="A", quantity=1), Item(sku="B\x00", quantity=1)]},
        "items[1].sku",
    ),
    ({"items": [Item(sku="A", quantity=1), Item(sku="B" * 65, quantity=1)]}, "items[1].sku"),
    ({"items": [Item(sku="A", quantity=1), Item(sku="B", quantity=0)]}, "items[1].quantity"),
    (
        {"items": [Item(sku="A", quantity=1), Item(sku="B", quantity=10_001)]},
        "items[1].quantity",
    ),
    (
        {"items": [Item(sku="A", quantity=1), Item(sku="B", quantity=1, unit_price_cents=-1)]},
        "items[1].unit_price_cents",
    ),
    (
        {
            "items": [
                Item(sku="A", quantity=1),
                Item(sku="B", quantity=1, unit_price_cents=10**12 + 1),
            ]
        },
        "items[1].unit_price_cents",
    ),
    (
        {
            "items": [
                Item(sku=f"S{n}", quantity=10_000, unit_price_cents=10**12) for n in range(1000)
            ]
        },
        "items",
    ),
]


@pytest.mark.parametrize(
    ("fields", "field"),
    BAD_ORDERS,
    ids=[f"{field}-{n}" for n, (_, field) in enumerate(BAD_ORDERS)],
)
async def test_one_bad_order_rejects_the_whole_import(orders, admin_db, fields, field):
    before = await table_counts(admin_db)
    import_id = unique("import")
    batches = [[order() for _ in range(4)] for _ in range(3)]
    batches[1][2] = order(**fields)
    error = await rpc_error(run_import(orders, messages(import_id, batches)))

    assert error.code == grpc.StatusCode.INVALID_ARGUMENT, error.message
    assert error.error_info.reason == "INVALID_FIELD"
    assert f"messages[1].orders[2].{field}" in error.violations, error.violations
    assert all(name.startswith("messages[1].orders[2].") for name in error.violations)
    assert await table_counts(admin_db) == before
    assert await stored_import(admin_db, import_id) is None


async def test_bad_order_is_located_across_uneven_messages(orders, admin_db):
    before = await table_counts(admin_db)
    batches = [[order() for _ in range(size)] for size in (2, 0, 5, 5, 300, 1)]
    batches[4][123] = order(items=[Item(sku="A", quantity=1), Item(sku="B", quantity=-3)])
    error = await rpc_error(run_import(orders, messages(unique("import"), batches)))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert list(error.violations) == ["messages[4].orders[123].items[1].quantity"]
    assert await table_counts(admin_db) == before


@pytest.mark.parametrize(
    ("requests", "field"),
    [
        ([], "messages"),
        ([Request(orders=[order()])], "messages[0].import_id"),
        ([Request(import_id="i" * 129, orders=[order()])], "messages[0].import_id"),
        ([Request(import_id="a\x00b", orders=[order()])], "messages[0].import_id"),
        (
            [
                Request(import_id="first", orders=[order()]),
                Request(orders=[order()]),
                Request(import_id="other", orders=[order()]),
            ],
            "messages[2].import_id",
        ),
    ],
    ids=["empty-stream", "missing", "too-long", "nul", "changed"],
)
async def test_import_id_is_required_first_and_unchanged(orders, admin_db, requests, field):
    before = await table_counts(admin_db)
    if requests and requests[0].import_id == "first":
        requests[0].import_id = unique("import")
    error = await rpc_error(run_import(orders, requests))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert list(error.violations) == [field]
    assert await table_counts(admin_db) == before
    if field == "messages[2].import_id":  # the only case with a valid id to claim
        assert await stored_import(admin_db, requests[0].import_id) is None


async def test_retry_after_commit_returns_the_first_response(orders, admin_db):
    import_id = unique("import")
    customer = unique("cust")
    first = await run_import(
        orders, messages(import_id, [[order(customer_id=customer) for _ in range(5)]] * 2)
    )
    before = await table_counts(admin_db)
    retried = await run_import(
        orders, messages(import_id, [[order(customer_id=unique("cust")) for _ in range(2)]])
    )
    assert retried == first
    assert first.order_count == 10
    assert await table_counts(admin_db) == before
    assert len(await orders_of(admin_db, customer)) == 10


async def test_concurrent_imports_with_one_id_commit_once(orders, admin_db, app):
    """The second waits for the first's claim and returns its response."""
    import_id = unique("import")
    customer_a, customer_b = unique("cust-a"), unique("cust-b")
    call_a = orders.ImportOrders()
    await call_a.write(Request(import_id=import_id, orders=[order(customer_id=customer_a)] * 20))
    await eventually(lambda: _copy_running(admin_db), what="the first import to start its COPY")
    call_b = orders.ImportOrders(stream(messages(import_id, [[order(customer_id=customer_b)] * 7])))
    await eventually(
        lambda: waiting_on_lock(admin_db, "INSERT INTO imports"),
        what="the second import to wait for the first's claim",
    )
    await call_a.write(Request(orders=[order(customer_id=customer_a)] * 20))
    await call_a.done_writing()
    response_a = await call_a
    response_b = await call_b

    assert response_a.order_count == 40
    assert response_b == response_a
    assert len(await orders_of(admin_db, customer_a)) == 40
    assert await orders_of(admin_db, customer_b) == []
    await eventually(lambda: pool_is_full(app), what="connections to return")


async def test_client_cancel_mid_stream_leaves_nothing(orders, admin_db, app):
    before = await table_counts(admin_db)
    import_id = unique("import")
    call = orders.ImportOrders()
    await call.write(Request(import_id=import_id, orders=[order()] * 1000))
    # Enough rows that some have reached PostgreSQL (asyncpg sends in chunks).
    for _ in range(19):
        await call.write(Request(orders=[order()] * 1000))
    await eventually(lambda: _some_rows_copied(admin_db), what="rows to reach the staging table")
    call.cancel()

    assert await call.code() == grpc.StatusCode.CANCELLED
    await eventually(lambda: pool_is_full(app), what="the connection to return")
    await eventually(lambda: nothing_left_running(admin_db), what="the COPY to end")
    assert await table_counts(admin_db) == before
    assert await stored_import(admin_db, import_id) is None


async def test_lost_client_connection_mid_stream_leaves_nothing(admin_db, app):
    before = await table_counts(admin_db)
    import_id = unique("import")
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    call = order_service_pb2_grpc.OrderServiceStub(channel).ImportOrders()
    for n in range(20):
        await call.write(Request(import_id=import_id if n == 0 else "", orders=[order()] * 1000))
    await eventually(lambda: _some_rows_copied(admin_db), what="rows to reach the staging table")
    await channel.close()  # the HTTP/2 connection goes away under the stream

    await eventually(lambda: pool_is_full(app), what="the connection to return")
    await eventually(lambda: nothing_left_running(admin_db), what="the COPY to end")
    assert await table_counts(admin_db) == before
    assert await stored_import(admin_db, import_id) is None


async def test_deadline_mid_stream_leaves_nothing(orders, admin_db, app):
    before = await table_counts(admin_db)
    import_id = unique("import")
    call = orders.ImportOrders(timeout=5)
    for n in range(20):
        await call.write(Request(import_id=import_id if n == 0 else "", orders=[order()] * 1000))
    await eventually(lambda: _some_rows_copied(admin_db), what="rows to reach the staging table")
    # The client stalls without half-closing; the deadline ends the import.
    error = await rpc_error(call)

    assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED
    await eventually(lambda: pool_is_full(app), what="the connection to return")
    await eventually(lambda: nothing_left_running(admin_db), what="the COPY to end")
    assert await table_counts(admin_db) == before
    assert await stored_import(admin_db, import_id) is None


async def test_imports_beyond_the_stream_limit_are_refused_with_retry_info(service_env, admin_db):
    async with (
        running_app(service_env, ORDERSTREAM_MAX_STREAMS="1") as small,
        grpc.aio.insecure_channel(f"127.0.0.1:{small.port}") as channel,
    ):
        stub = order_service_pb2_grpc.OrderServiceStub(channel)
        held = stub.ImportOrders()
        await held.write(Request(import_id=unique("import"), orders=[order()]))
        await eventually(lambda: _copy_running(admin_db), what="the first import to start")

        error = await rpc_error(run_import(stub, messages(unique("import"), [[order()]])))
        assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error.error_info.reason == "TOO_MANY_STREAMS"
        assert error.retry_info is not None

        await held.done_writing()
        assert (await held).order_count == 1
        assert (await run_import(stub, messages(unique("import"), [[order()]]))).order_count == 1
        await eventually(lambda: pool_is_full(small), what="connections to return")


async def test_sequential_imports_on_one_connection(service_env, admin_db):
    """The staging table is dropped at each commit and created anew."""
    async with (
        running_app(
            service_env, ORDERSTREAM_POOL_MIN_SIZE="1", ORDERSTREAM_POOL_MAX_SIZE="1"
        ) as small,
        grpc.aio.insecure_channel(f"127.0.0.1:{small.port}") as channel,
    ):
        stub = order_service_pb2_grpc.OrderServiceStub(channel)
        for size in (3, 1, 2):
            response = await run_import(stub, messages(unique("import"), [[order()] * size]))
            assert response.order_count == size
        bad = await rpc_error(
            run_import(stub, messages(unique("import"), [[order(), order(currency="x")]]))
        )
        assert bad.code == grpc.StatusCode.INVALID_ARGUMENT
        assert (await run_import(stub, messages(unique("import"), [[order()]]))).order_count == 1


async def test_larger_import_in_many_messages(orders, admin_db, app):
    customer = unique("cust-large")
    per_message, count = 500, 20_000
    requests = [
        Request(
            import_id=unique("import") if m == 0 else "",
            orders=[
                order(
                    customer_id=customer,
                    items=[
                        Item(sku=f"SKU-{k}", quantity=k + 1, unit_price_cents=m * per_message + n)
                        for k in range(3)
                    ],
                )
                for n in range(per_message)
            ],
        )
        for m in range(count // per_message)
    ]
    response = await run_import(orders, requests)

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
