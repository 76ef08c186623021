"""service/orders/wire.c against the protobuf runtime: for any order rows, the
C encoder must write exactly the bytes protobuf serialises for the
ListOrdersResponse (and, in messages bounded in bytes, the
ExportOrdersResponses) built from order_from_row's messages, and for one
such message alone (GetOrder's), and refuse rows it cannot encode with an
error instead of a wrong message."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orderstream.orders.v1 import order_pb2, order_service_pb2
from service.orders.convert import STATUS_VALUES, order_from_row
from service.orders.wire import encode_order, encode_orders, encode_page
from tests.support.packing import messages_of

# google.protobuf.Timestamp's range, 0001-01-01 to 9999-12-31, in microseconds.
MIN_TIME_US = -62_135_596_800_000_000
MAX_TIME_US = 253_402_300_799_999_999
COLUMNS = (
    "id", "customer_id", "currency", "status", "total_cents", "version",
    "create_time", "update_time", "skus", "quantities", "prices",
)  # fmt: skip

int64s = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.sampled_from([0, 1, 127, 128, 16_383, 16_384, -1]),  # varint lengths' edges
)
times = st.one_of(
    st.integers(min_value=MIN_TIME_US, max_value=MAX_TIME_US),
    st.sampled_from([0, -1, 1, 999_999, 1_000_000, -1_000_000, -1_000_001]),
)
texts = st.text(max_size=40)  # empty, ASCII and not, astral planes included
items = st.lists(
    st.tuples(
        st.one_of(texts, st.text(min_size=130, max_size=200)),  # 1- and 2-byte lengths
        st.integers(min_value=-(2**31), max_value=2**31 - 1),
        int64s,
    ),
    max_size=5,
)


@st.composite
def order_rows(draw: st.DrawFn) -> tuple:
    lines = draw(items)
    return (
        draw(int64s),
        draw(texts),
        draw(texts),
        draw(st.sampled_from(sorted(STATUS_VALUES))),
        draw(int64s),
        draw(int64s),
        draw(times),
        draw(times),
        [sku for sku, _, _ in lines],
        [quantity for _, quantity, _ in lines],
        [price for _, _, price in lines],
    )


class Row(tuple):
    """A row as asyncpg's Record is one: by position for the encoder, by
    column name for order_from_row."""

    def __getitem__(self, key):  # type: ignore[override]
        return super().__getitem__(COLUMNS.index(key) if isinstance(key, str) else key)


def protobuf_bytes(rows: list[tuple], count: int, token: str) -> bytes:
    orders = [order_from_row(Row(row)) for row in rows[:count]]
    return order_service_pb2.ListOrdersResponse(
        orders=orders, next_page_token=token
    ).SerializeToString()


@settings(derandomize=True, max_examples=400)
@given(st.lists(order_rows(), max_size=6), st.data(), st.one_of(st.just(""), texts))
def test_bytes_are_what_protobuf_writes(rows, data, token):
    count = data.draw(st.integers(min_value=0, max_value=len(rows)))
    assert encode_page(rows, count, STATUS_VALUES, token) == protobuf_bytes(rows, count, token)


@settings(derandomize=True, max_examples=400)
@given(order_rows())
def test_one_order_is_what_protobuf_writes_for_it(row):
    assert encode_order(row, STATUS_VALUES) == order_from_row(Row(row)).SerializeToString()


def entry_size(row: tuple) -> int:
    return len(encode_orders([row], 0, 0, 1 << 30, STATUS_VALUES)[0])


@settings(derandomize=True, max_examples=200)
@given(st.lists(order_rows(), min_size=1, max_size=8), st.integers(min_value=1, max_value=400))
def test_export_messages_fill_up_to_the_budget_and_join_into_the_whole(rows, budget):
    """Drives the encoder as ExportOrders does: a message is sent when the
    next order does not fit in it."""
    messages = messages_of(
        lambda *window: encode_orders(*window, STATUS_VALUES), rows, budget, entry_size
    )
    assert b"".join(messages) == protobuf_bytes(rows, len(rows), "")
    for message in messages:
        parsed = order_service_pb2.ExportOrdersResponse.FromString(message)
        assert len(message) <= budget or len(parsed.orders) == 1


def test_an_order_that_does_not_fit_is_left_for_the_next_message():
    size = entry_size(GOOD)
    rows = [GOOD, GOOD, GOOD]
    assert encode_orders(rows, 0, 1, size, STATUS_VALUES) == (b"", 0)
    assert encode_orders(rows, 0, 0, 2 * size, STATUS_VALUES) == (
        2 * encode_page([GOOD], 1, STATUS_VALUES, ""),
        2,
    )
    assert encode_orders(rows, 1, 0, 1, STATUS_VALUES) == (
        encode_page([GOOD], 1, STATUS_VALUES, ""),
        2,
    )  # alone, too big
    assert encode_orders(rows, 3, 0, 1, STATUS_VALUES) == (b"", 3)


@pytest.mark.parametrize(
    ("start", "used", "budget", "error"),
    [(-1, 0, 1, IndexError), (4, 0, 1, IndexError), (0, -1, 1, ValueError), (0, 0, 0, ValueError)],
)
def test_export_arguments_out_of_range_are_refused(start, used, budget, error):
    with pytest.raises(error):
        encode_orders([GOOD] * 3, start, used, budget, STATUS_VALUES)


def test_a_page_of_records_parses_back_to_its_orders():
    row = (7, "c-7", "EUR", "PAID", 300, 2, 1_000_001, 2_000_000, ["a", "b"], [1, 2], [100, 100])
    page = order_service_pb2.ListOrdersResponse.FromString(
        encode_page([row, row], 1, STATUS_VALUES, "next")
    )
    assert [order.id for order in page.orders] == [7]
    assert page.next_page_token == "next"
    order = page.orders[0]
    assert [(i.sku, i.quantity, i.unit_price_cents) for i in order.items] == [
        ("a", 1, 100),
        ("b", 2, 100),
    ]
    assert (order.create_time.seconds, order.create_time.nanos) == (1, 1000)


def test_an_order_without_items_is_written_without_items():
    """Rows written by other than the service may have no items; the
    aggregate then gives NULL arrays."""
    row = (1, "c", "EUR", "PENDING", 0, 1, 0, 0, None, None, None)
    page = order_service_pb2.ListOrdersResponse.FromString(encode_page([row], 1, STATUS_VALUES, ""))
    assert page.orders[0].id == 1
    assert not page.orders[0].items
    assert page.orders[0].HasField("create_time")
    order = order_pb2.Order.FromString(encode_order(row, STATUS_VALUES))
    assert order.id == 1
    assert not order.items


GOOD = (1, "c", "EUR", "PENDING", 0, 1, 0, 0, ["a"], [1], [5])


def good_but(column: str, value: object) -> tuple:
    row = list(GOOD)
    row[COLUMNS.index(column)] = value
    return tuple(row)


@pytest.mark.parametrize(
    ("row", "error", "says"),
    [
        (GOOD[:10], ValueError, "11 columns"),
        (good_but("customer_id", 2), TypeError, "customer_id must be str"),
        (good_but("status", "LOST"), KeyError, "LOST"),
        (good_but("skus", ["a", "b"]), ValueError, "quantities hold 1 items, its skus 2"),
        (good_but("quantities", [2**31]), ValueError, "not an int32"),
        (good_but("create_time", 2**63), OverflowError, "too big"),
        (good_but("skus", [None]), TypeError, "sku must be str"),
    ],
    ids=["short", "text", "status", "lengths", "quantity", "time", "sku"],
)
def test_rows_it_cannot_encode_are_refused(row, error, says):
    with pytest.raises(error, match=says):
        encode_page([GOOD, row], 2, STATUS_VALUES, "")
    with pytest.raises(error, match=says):
        encode_orders([GOOD, row], 0, 0, 1 << 20, STATUS_VALUES)
    with pytest.raises(error, match=says):
        encode_order(row, STATUS_VALUES)


def test_count_must_be_within_the_rows():
    with pytest.raises(IndexError):
        encode_page([GOOD], 2, STATUS_VALUES, "")
    assert encode_page([GOOD], 0, STATUS_VALUES, "") == b""
