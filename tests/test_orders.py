"""OrderService over a real channel: behaviour, errors, idempotency, paging."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from orderstream.orders.v1 import order_pb2, order_service_pb2
from tests.support.database import table_counts
from tests.support.requests import create_request, unique
from tests.support.status import rpc_error

pytestmark = pytest.mark.through_pgbouncer

PENDING = order_pb2.ORDER_STATUS_PENDING
PAID = order_pb2.ORDER_STATUS_PAID
SHIPPED = order_pb2.ORDER_STATUS_SHIPPED
DELIVERED = order_pb2.ORDER_STATUS_DELIVERED
CANCELLED = order_pb2.ORDER_STATUS_CANCELLED


async def order_count(admin_db, customer_id: str) -> int:
    return await admin_db.fetchval(
        "SELECT count(*) FROM orders WHERE customer_id = $1", customer_id
    )


async def test_create_order_computes_total_and_writes_event(orders, admin_db):
    request = create_request()
    order = await orders.CreateOrder(request)

    assert order.id > 0
    assert order.status == PENDING
    assert order.version == 1
    assert order.total_cents == 2 * 1250 + 99
    assert list(order.items) == list(request.items)
    assert order.create_time == order.update_time
    assert order.create_time.seconds > 0
    event = await admin_db.fetchrow(
        "SELECT type, source, payload::text FROM events "
        "WHERE subject = $1 AND source = 'orderstream'",
        f"orders/{order.id}",
    )
    assert event["type"] == "order.created"
    assert '"total_cents": 2599' in event["payload"]


async def test_get_order_returns_what_create_returned(orders):
    created = await orders.CreateOrder(create_request())
    fetched = await orders.GetOrder(order_service_pb2.GetOrderRequest(id=created.id))
    assert fetched == created


async def test_get_missing_order_is_not_found(orders):
    error = await rpc_error(orders.GetOrder(order_service_pb2.GetOrderRequest(id=2**62)))
    assert error.code == grpc.StatusCode.NOT_FOUND
    assert error.error_info.reason == "ORDER_NOT_FOUND"
    assert error.error_info_count == 1


@pytest.mark.parametrize("bad_id", [0, -1, -(2**63)])
async def test_get_order_rejects_non_positive_ids(orders, bad_id):
    error = await rpc_error(orders.GetOrder(order_service_pb2.GetOrderRequest(id=bad_id)))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "id" in error.violations


INVALID_CREATES = [
    ({"request_id": ""}, "request_id"),
    ({"request_id": "x" * 129}, "request_id"),
    ({"request_id": "a\x00b"}, "request_id"),
    ({"customer_id": ""}, "customer_id"),
    ({"customer_id": "c\x00"}, "customer_id"),
    ({"currency": "eur"}, "currency"),
    ({"currency": "EURO"}, "currency"),
    ({"currency": "ÄÖÜ"}, "currency"),
    ({"items": []}, "items"),
    ({"items": [order_pb2.LineItem(sku="A", quantity=1, unit_price_cents=1)] * 1001}, "items"),
    ({"items": [order_pb2.LineItem(sku="", quantity=1, unit_price_cents=1)]}, "items[0].sku"),
    ({"items": [order_pb2.LineItem(sku="A\x00", quantity=1, unit_price_cents=1)]}, "items[0].sku"),
    ({"items": [order_pb2.LineItem(sku="A", quantity=0, unit_price_cents=1)]}, "items[0].quantity"),
    (
        {"items": [order_pb2.LineItem(sku="A", quantity=10001, unit_price_cents=1)]},
        "items[0].quantity",
    ),
    (
        {"items": [order_pb2.LineItem(sku="A", quantity=1, unit_price_cents=-1)]},
        "items[0].unit_price_cents",
    ),
    (
        {"items": [order_pb2.LineItem(sku="A", quantity=1, unit_price_cents=2**62)]},
        "items[0].unit_price_cents",
    ),
]


@pytest.mark.parametrize(("overrides", "field"), INVALID_CREATES)
async def test_create_order_rejects_invalid_fields(orders, admin_db, overrides, field):
    before = await table_counts(admin_db)
    error = await rpc_error(orders.CreateOrder(create_request(**overrides)))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert field in error.violations, error.violations
    assert error.error_info.reason == "INVALID_FIELD"
    assert await table_counts(admin_db) == before


async def test_create_order_rejects_a_total_beyond_int64(orders):
    item = order_pb2.LineItem(sku="A", quantity=10_000, unit_price_cents=10**12)
    error = await rpc_error(orders.CreateOrder(create_request(items=[item] * 1000)))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "64 bits" in error.violations["items"]


async def test_create_order_reports_every_invalid_field_at_once(orders):
    request = create_request(request_id="", currency="x", items=[])
    error = await rpc_error(orders.CreateOrder(request))
    assert {"request_id", "currency", "items"} <= set(error.violations)


async def test_retry_with_same_request_id_returns_original_and_writes_nothing(orders, admin_db):
    request = create_request()
    first = await orders.CreateOrder(request)
    second = await orders.CreateOrder(request)
    assert second == first
    assert await order_count(admin_db, request.customer_id) == 1
    assert (
        await admin_db.fetchval(
            "SELECT count(*) FROM events WHERE subject = $1", f"orders/{first.id}"
        )
        == 1
    )


async def test_same_request_id_with_different_body_is_already_exists(orders, admin_db):
    request = create_request()
    first = await orders.CreateOrder(request)
    changed = create_request(request_id=request.request_id, customer_id=request.customer_id)
    changed.items[0].quantity += 1
    error = await rpc_error(orders.CreateOrder(changed))
    assert error.code == grpc.StatusCode.ALREADY_EXISTS
    assert error.error_info.reason == "REQUEST_ID_REUSED"
    assert error.error_info.metadata["order_id"] == str(first.id)
    assert await order_count(admin_db, request.customer_id) == 1


async def test_concurrent_identical_requests_create_one_order(orders, admin_db):
    request = create_request()
    results = await asyncio.gather(*(orders.CreateOrder(request) for _ in range(16)))
    assert len({r.id for r in results}) == 1
    assert all(r == results[0] for r in results)
    assert await order_count(admin_db, request.customer_id) == 1


async def test_many_concurrent_creates_each_get_their_own_order(orders, admin_db):
    """Creates that arrive together may share a statement (service/orders/
    create_batches.py; tests/test_create_batches.py decides which do): each
    still gets its own order with its own items, repeats get the original,
    a reused request_id with another body fails alone, and every order has
    one order.created event."""
    customer = unique("cust")
    requests = [
        create_request(
            customer_id=customer,
            items=[
                order_pb2.LineItem(sku=f"SKU-{n}-{k}", quantity=k + 1, unit_price_cents=100 + n)
                for k in range(1 + n % 4)
            ],
        )
        for n in range(40)
    ]
    reused = create_request(request_id=requests[0].request_id, customer_id=customer)
    calls = [*requests, requests[1], requests[2], reused]
    results = await asyncio.gather(
        *(orders.CreateOrder(request) for request in calls), return_exceptions=True
    )

    # requests[0] and `reused` share a request_id: concurrent calls have no
    # order, so either may be the one written; the other fails alone.
    kept, refused = results[0], results[42]
    if isinstance(kept, grpc.aio.AioRpcError):
        kept, refused, requests[0] = refused, kept, reused
    assert isinstance(refused, grpc.aio.AioRpcError)
    assert refused.code() == grpc.StatusCode.ALREADY_EXISTS
    created = [kept, *results[1:40]]
    for request, order in zip(requests, created, strict=True):
        assert list(order.items) == list(request.items)
        assert order.total_cents == sum(i.quantity * i.unit_price_cents for i in request.items)
        assert await orders.GetOrder(order_service_pb2.GetOrderRequest(id=order.id)) == order
    assert len({order.id for order in created}) == 40
    assert results[40:42] == [created[1], created[2]]
    assert await order_count(admin_db, customer) == 40
    assert (
        await admin_db.fetchval(
            "SELECT count(*) FROM events WHERE type = 'order.created' AND subject = ANY($1)",
            [f"orders/{order.id}" for order in created],
        )
        == 40
    )


@pytest.mark.parametrize(
    "text",
    [
        "'; DROP TABLE orders; --",
        "Robert'); DELETE FROM events WHERE ('1'='1",
        "$1 $2 \\x00 %s {} \" ' `",
        "ünïcödé ✓ 🚀",
    ],
)
async def test_sql_injection_strings_are_stored_verbatim(orders, admin_db, text):
    request = create_request(
        customer_id=text, items=[order_pb2.LineItem(sku=text, quantity=1, unit_price_cents=5)]
    )
    order = await orders.CreateOrder(request)
    fetched = await orders.GetOrder(order_service_pb2.GetOrderRequest(id=order.id))
    assert fetched.customer_id == text
    assert fetched.items[0].sku == text
    assert await admin_db.fetchval("SELECT count(*) FROM orders WHERE id = $1", order.id) == 1


# --- UpdateOrderStatus -------------------------------------------------------

LEGAL_PATHS = [
    [PAID],
    [PAID, SHIPPED],
    [PAID, SHIPPED, DELIVERED],
    [CANCELLED],
    [PAID, CANCELLED],
]


@pytest.mark.parametrize("path", LEGAL_PATHS)
async def test_legal_transitions_bump_version_and_write_events(orders, admin_db, path):
    order = await orders.CreateOrder(create_request())
    for step, status in enumerate(path, start=2):
        order = await orders.UpdateOrderStatus(
            order_service_pb2.UpdateOrderStatusRequest(id=order.id, status=status)
        )
        assert order.status == status
        assert order.version == step
    assert order.update_time.ToNanoseconds() >= order.create_time.ToNanoseconds()
    assert len(order.items) == 2
    types = await admin_db.fetch(
        "SELECT type FROM events WHERE subject = $1 ORDER BY id", f"orders/{order.id}"
    )
    assert [t["type"] for t in types] == ["order.created"] + ["order.status_changed"] * len(path)


ILLEGAL = [
    ([], PENDING),
    ([], SHIPPED),
    ([], DELIVERED),
    ([PAID], PAID),
    ([PAID], DELIVERED),
    ([PAID, SHIPPED], CANCELLED),
    ([PAID, SHIPPED, DELIVERED], CANCELLED),
    ([CANCELLED], PAID),
    ([CANCELLED], PENDING),
]


@pytest.mark.parametrize(("path", "target"), ILLEGAL)
async def test_illegal_transitions_are_failed_precondition(orders, admin_db, path, target):
    order = await orders.CreateOrder(create_request())
    for status in path:
        order = await orders.UpdateOrderStatus(
            order_service_pb2.UpdateOrderStatusRequest(id=order.id, status=status)
        )
    error = await rpc_error(
        orders.UpdateOrderStatus(
            order_service_pb2.UpdateOrderStatusRequest(id=order.id, status=target)
        )
    )
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert error.error_info.reason == "ILLEGAL_TRANSITION"
    unchanged = await orders.GetOrder(order_service_pb2.GetOrderRequest(id=order.id))
    assert unchanged == order
    assert await admin_db.fetchval(
        "SELECT count(*) FROM events WHERE subject = $1", f"orders/{order.id}"
    ) == 1 + len(path)


async def test_stale_expected_version_is_aborted(orders):
    order = await orders.CreateOrder(create_request())
    paid = await orders.UpdateOrderStatus(
        order_service_pb2.UpdateOrderStatusRequest(id=order.id, status=PAID, expected_version=1)
    )
    error = await rpc_error(
        orders.UpdateOrderStatus(
            order_service_pb2.UpdateOrderStatusRequest(
                id=order.id, status=SHIPPED, expected_version=1
            )
        )
    )
    assert error.code == grpc.StatusCode.ABORTED
    assert error.error_info.reason == "VERSION_MISMATCH"
    assert error.error_info.metadata["current_version"] == "2"
    assert error.retry_info is not None
    shipped = await orders.UpdateOrderStatus(
        order_service_pb2.UpdateOrderStatusRequest(id=order.id, status=SHIPPED, expected_version=2)
    )
    assert shipped.version == paid.version + 1


async def test_concurrent_conditional_updates_let_exactly_one_win(orders):
    order = await orders.CreateOrder(create_request())
    request = order_service_pb2.UpdateOrderStatusRequest(
        id=order.id, status=PAID, expected_version=1
    )
    results = await asyncio.gather(
        *(orders.UpdateOrderStatus(request) for _ in range(8)), return_exceptions=True
    )
    winners = [r for r in results if isinstance(r, order_pb2.Order)]
    losers = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(winners) == 1
    assert len(losers) == 7
    assert {e.code() for e in losers} == {grpc.StatusCode.ABORTED}


async def test_update_missing_order_is_not_found(orders):
    error = await rpc_error(
        orders.UpdateOrderStatus(order_service_pb2.UpdateOrderStatusRequest(id=2**62, status=PAID))
    )
    assert error.code == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"id": 0, "status": PAID}, "id"),
        ({"id": 1, "status": order_pb2.ORDER_STATUS_UNSPECIFIED}, "status"),
        ({"id": 1, "status": 42}, "status"),
        ({"id": 1, "status": PAID, "expected_version": -3}, "expected_version"),
    ],
)
async def test_update_rejects_invalid_fields(orders, fields, field):
    error = await rpc_error(
        orders.UpdateOrderStatus(order_service_pb2.UpdateOrderStatusRequest(**fields))
    )
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert field in error.violations


# --- ListOrders ----------------------------------------------------------------


async def create_orders(orders, customer_id: str, count: int) -> list[order_pb2.Order]:
    return [await orders.CreateOrder(create_request(customer_id=customer_id)) for _ in range(count)]


async def walk(orders, request: order_service_pb2.ListOrdersRequest) -> list[int]:
    ids: list[int] = []
    while True:
        page = await orders.ListOrders(request)
        ids += [o.id for o in page.orders]
        if not page.next_page_token:
            return ids
        request.page_token = page.next_page_token


async def test_list_pages_through_a_customers_orders(orders):
    customer = unique("cust")
    created = await create_orders(orders, customer, 7)
    first = await orders.ListOrders(
        order_service_pb2.ListOrdersRequest(customer_id=customer, page_size=3)
    )
    assert [o.id for o in first.orders] == [o.id for o in created[:3]]
    assert first.orders[0] == created[0]
    ids = await walk(orders, order_service_pb2.ListOrdersRequest(customer_id=customer, page_size=3))
    assert ids == [o.id for o in created]


async def test_an_order_written_without_items_reads_back_without_items(orders, admin_db):
    """The service never writes an order without items, but another writer
    may: GetOrder and ListOrders answer it (the items' aggregate is then
    NULL) instead of failing on it."""
    customer = unique("bare")
    order_id = await admin_db.fetchval(
        "INSERT INTO orders (customer_id, currency, total_cents) VALUES ($1, 'EUR', 0)"
        " RETURNING id",
        customer,
    )
    got = await orders.GetOrder(order_service_pb2.GetOrderRequest(id=order_id))
    assert (got.id, got.customer_id, list(got.items)) == (order_id, customer, [])
    page = await orders.ListOrders(order_service_pb2.ListOrdersRequest(customer_id=customer))
    assert list(page.orders) == [got]


async def test_list_default_page_size_is_50(orders):
    customer = unique("cust")
    await create_orders(orders, customer, 51)
    page = await orders.ListOrders(order_service_pb2.ListOrdersRequest(customer_id=customer))
    assert len(page.orders) == 50
    assert page.next_page_token


async def test_list_last_page_has_no_token(orders):
    customer = unique("cust")
    await create_orders(orders, customer, 2)
    page = await orders.ListOrders(
        order_service_pb2.ListOrdersRequest(customer_id=customer, page_size=2)
    )
    assert len(page.orders) == 2
    assert page.next_page_token == ""


async def test_list_filters_by_status_and_time(orders):
    customer = unique("cust")
    created = await create_orders(orders, customer, 4)
    for order in created[:2]:
        await orders.UpdateOrderStatus(
            order_service_pb2.UpdateOrderStatusRequest(id=order.id, status=PAID)
        )
    paid = await orders.ListOrders(
        order_service_pb2.ListOrdersRequest(customer_id=customer, status=PAID)
    )
    assert [o.id for o in paid.orders] == [o.id for o in created[:2]]

    boundary = created[2].create_time
    later = await orders.ListOrders(
        order_service_pb2.ListOrdersRequest(customer_id=customer, created_after=boundary)
    )
    assert [o.id for o in later.orders] == [o.id for o in created[2:]]
    earlier = await orders.ListOrders(
        order_service_pb2.ListOrdersRequest(customer_id=customer, created_before=boundary)
    )
    assert [o.id for o in earlier.orders] == [o.id for o in created[:2]]


async def test_a_creation_window_pages_through_exactly_its_orders(orders):
    """A listing by creation time walks the window's ids only (found on its
    first page, carried by the token): one order a page, every order of a
    closed window once, then the end, and the same for an open one."""
    customer = unique("cust")
    created = await create_orders(orders, customer, 5)
    window = {"created_after": created[1].create_time, "created_before": created[3].create_time}
    request = order_service_pb2.ListOrdersRequest(customer_id=customer, page_size=1, **window)
    assert await walk(orders, request) == [o.id for o in created[1:3]]
    request = order_service_pb2.ListOrdersRequest(
        customer_id=customer, page_size=1, created_after=created[3].create_time
    )
    assert await walk(orders, request) == [o.id for o in created[3:]]
    empty = order_service_pb2.ListOrdersRequest(
        customer_id=customer,
        created_after=created[4].create_time,
        created_before=created[4].create_time,
    )
    assert await walk(orders, empty) == []


async def test_list_walk_during_concurrent_inserts_never_repeats_or_skips(orders):
    customer = unique("cust")
    existing = await create_orders(orders, customer, 30)
    stop = asyncio.Event()

    async def keep_inserting() -> None:
        while not stop.is_set():
            await orders.CreateOrder(create_request(customer_id=customer))

    writers = [asyncio.create_task(keep_inserting()) for _ in range(3)]
    try:
        ids = []
        request = order_service_pb2.ListOrdersRequest(customer_id=customer, page_size=4)
        while True:
            page = await orders.ListOrders(request)
            ids += [o.id for o in page.orders]
            # Let the writers land rows between pages.
            await orders.CreateOrder(create_request(customer_id=customer))
            if not page.next_page_token or len(ids) >= 60:
                break
            request.page_token = page.next_page_token
    finally:
        stop.set()
        await asyncio.gather(*writers)
    assert len(ids) == len(set(ids)), "a row was repeated"
    assert ids == sorted(ids)
    assert {o.id for o in existing} <= set(ids), "an existing row was skipped"


async def test_tampered_page_token_is_invalid_argument(orders):
    customer = unique("cust")
    await create_orders(orders, customer, 3)
    page = await orders.ListOrders(
        order_service_pb2.ListOrdersRequest(customer_id=customer, page_size=1)
    )
    token = page.next_page_token
    flipped = token[:5] + ("A" if token[5] != "A" else "B") + token[6:]
    for bad in (flipped, token[:-2], token + "AA", "not a token", "🚀", "\x00"):
        error = await rpc_error(
            orders.ListOrders(
                order_service_pb2.ListOrdersRequest(
                    customer_id=customer, page_size=1, page_token=bad
                )
            )
        )
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT, bad
        assert "page_token" in error.violations


async def test_page_token_from_another_query_is_invalid_argument(orders):
    customer = unique("cust")
    await create_orders(orders, customer, 3)
    page = await orders.ListOrders(
        order_service_pb2.ListOrdersRequest(customer_id=customer, page_size=1)
    )
    error = await rpc_error(
        orders.ListOrders(
            order_service_pb2.ListOrdersRequest(
                customer_id=unique("other"), page_size=1, page_token=page.next_page_token
            )
        )
    )
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "different query" in error.violations["page_token"]


async def test_page_size_may_change_between_pages(orders):
    customer = unique("cust")
    created = await create_orders(orders, customer, 5)
    page = await orders.ListOrders(
        order_service_pb2.ListOrdersRequest(customer_id=customer, page_size=1)
    )
    rest = await orders.ListOrders(
        order_service_pb2.ListOrdersRequest(
            customer_id=customer, page_size=10, page_token=page.next_page_token
        )
    )
    assert [o.id for o in rest.orders] == [o.id for o in created[1:]]


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"page_size": -1}, "page_size"),
        ({"page_size": 1001}, "page_size"),
        ({"status": 99}, "status"),
        ({"customer_id": "a\x00"}, "customer_id"),
        ({"created_after": Timestamp(seconds=-62_135_596_801)}, "created_after"),
        ({"created_before": Timestamp(seconds=253_402_300_800)}, "created_before"),
        ({"created_before": Timestamp(seconds=0, nanos=-1)}, "created_before"),
    ],
)
async def test_list_rejects_invalid_fields(orders, fields, field):
    error = await rpc_error(orders.ListOrders(order_service_pb2.ListOrdersRequest(**fields)))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert field in error.violations


# --- UpdateOrderStatus' request_id -------------------------------------------------


async def status_changes(admin_db, order_id: int) -> int:
    return await admin_db.fetchval(
        "SELECT count(*) FROM events WHERE subject = $1 AND type = 'order.status_changed'",
        f"orders/{order_id}",
    )


@pytest.mark.parametrize("expected_version", [0, 1], ids=["unconditional", "conditional"])
async def test_a_retried_status_change_answers_the_order_as_it_stands(
    orders, admin_db, expected_version
):
    order = await orders.CreateOrder(create_request())
    paying = order_service_pb2.UpdateOrderStatusRequest(
        id=order.id, status=PAID, expected_version=expected_version, request_id=unique("pay-")
    )
    paid = await orders.UpdateOrderStatus(paying)
    assert await orders.UpdateOrderStatus(paying) == paid
    shipped = await orders.UpdateOrderStatus(
        order_service_pb2.UpdateOrderStatusRequest(id=order.id, status=SHIPPED)
    )
    # Later changes by others show in the answer: the order as it now stands.
    assert await orders.UpdateOrderStatus(paying) == shipped
    assert await status_changes(admin_db, order.id) == 2


async def test_concurrent_keyed_conditional_updates_still_let_one_caller_win(orders, admin_db):
    order = await orders.CreateOrder(create_request())
    requests = [
        order_service_pb2.UpdateOrderStatusRequest(
            id=order.id, status=PAID, expected_version=1, request_id=unique("racer-")
        )
        for _ in range(6)
    ]
    results = await asyncio.gather(
        *(orders.UpdateOrderStatus(r) for r in requests), return_exceptions=True
    )
    winners = [r for r in results if isinstance(r, order_pb2.Order)]
    assert len(winners) == 1
    assert {r.code() for r in results if isinstance(r, grpc.aio.AioRpcError)} == {
        grpc.StatusCode.ABORTED
    }
    assert await status_changes(admin_db, order.id) == 1


async def test_a_status_request_id_with_another_body_is_already_exists(orders, admin_db):
    first = await orders.CreateOrder(create_request())
    second = await orders.CreateOrder(create_request())
    key = unique("pay-")
    await orders.UpdateOrderStatus(
        order_service_pb2.UpdateOrderStatusRequest(id=first.id, status=PAID, request_id=key)
    )
    before = await table_counts(admin_db)
    for reused in (
        order_service_pb2.UpdateOrderStatusRequest(id=second.id, status=PAID, request_id=key),
        order_service_pb2.UpdateOrderStatusRequest(id=first.id, status=SHIPPED, request_id=key),
    ):
        error = await rpc_error(orders.UpdateOrderStatus(reused))
        assert error.code == grpc.StatusCode.ALREADY_EXISTS
        assert error.error_info.reason == "REQUEST_ID_REUSED"
        assert error.error_info.metadata["order_id"] == str(first.id)
    assert await table_counts(admin_db) == before


async def test_an_unkeyed_repeat_of_a_change_is_still_failed_precondition(orders):
    order = await orders.CreateOrder(create_request())
    paying = order_service_pb2.UpdateOrderStatusRequest(id=order.id, status=PAID)
    await orders.UpdateOrderStatus(paying)
    error = await rpc_error(orders.UpdateOrderStatus(paying))
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION


async def test_a_refused_keyed_change_records_nothing(orders, admin_db):
    order = await orders.CreateOrder(create_request())
    key = unique("ship-")
    shipping = order_service_pb2.UpdateOrderStatusRequest(
        id=order.id, status=SHIPPED, request_id=key
    )
    error = await rpc_error(orders.UpdateOrderStatus(shipping))
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert not await admin_db.fetchval(
        "SELECT count(*) FROM status_requests WHERE request_id = $1", key
    )
