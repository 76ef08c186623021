"""The rules an order's body obeys, shared by CreateOrder and ImportOrders."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from orderstream.orders.v1 import order_pb2, order_service_pb2
from service.rpc.validation import MAX_ID_LENGTH, Violations

MAX_ITEMS = 1000
MAX_SKU_LENGTH = 64
MAX_QUANTITY = 10_000
MAX_UNIT_PRICE_CENTS = 10**12
MAX_TOTAL_CENTS = 2**63 - 1


def order_total(
    v: Violations,
    order: order_service_pb2.CreateOrderRequest | order_pb2.Order,
    prefix: str = "",
) -> int:
    """Adds a violation to `v` for every broken rule of the order's customer,
    currency and items (fields named `{prefix}customer_id`,
    `{prefix}items[2].quantity`, ...); returns the total in cents, which is
    meaningful only if nothing was added.

    Field names are formatted only for violations: ImportOrders runs this for
    every order of a stream.
    """
    v.text(f"{prefix}customer_id", order.customer_id, max_length=MAX_ID_LENGTH)
    currency = order.currency
    if not (
        len(currency) == 3 and currency.isascii() and currency.isalpha() and currency.isupper()
    ):
        v.add(f"{prefix}currency", "must be three upper-case letters (ISO 4217), e.g. EUR")
    items = order.items
    if not 1 <= len(items) <= MAX_ITEMS:
        v.add(f"{prefix}items", f"must hold 1 to {MAX_ITEMS} items, got {len(items)}")
    total = 0
    for n, item in enumerate(items[:MAX_ITEMS]):
        sku = item.sku
        if not sku or len(sku) > MAX_SKU_LENGTH or "\x00" in sku:
            v.text(f"{prefix}items[{n}].sku", sku, max_length=MAX_SKU_LENGTH)
        quantity = item.quantity
        if not 1 <= quantity <= MAX_QUANTITY:
            v.add(f"{prefix}items[{n}].quantity", f"must be 1 to {MAX_QUANTITY}, got {quantity}")
        price = item.unit_price_cents
        if not 0 <= price <= MAX_UNIT_PRICE_CENTS:
            v.add(
                f"{prefix}items[{n}].unit_price_cents",
                f"must be 0 to {MAX_UNIT_PRICE_CENTS}, got {price}",
            )
        total += quantity * price
    if total > MAX_TOTAL_CENTS:
        v.add(f"{prefix}items", "the order's total does not fit in 64 bits")
    return total


def checked_create(request: order_service_pb2.CreateOrderRequest) -> int:
    """Validates a CreateOrder request (INVALID_ARGUMENT naming every bad
    field); returns the order's total in cents."""
    v = Violations()
    v.text("request_id", request.request_id, max_length=MAX_ID_LENGTH)
    total = order_total(v, request)
    v.raise_if_any()
    return total


def body_digest(request: order_service_pb2.CreateOrderRequest) -> bytes:
    """Identifies the request body, so a retry can be told from a reused key."""
    body = order_service_pb2.CreateOrderRequest()
    body.CopyFrom(request)
    body.request_id = ""
    return hashlib.sha256(body.SerializeToString(deterministic=True)).digest()


def item_columns(
    items: Sequence[order_pb2.LineItem],
) -> tuple[list[str], list[int], list[int]]:
    """Line items as the three arrays the order SQL unnests (sku, quantity,
    unit price), for CreateOrder, ImportOrders and the bench's peer."""
    return (
        [item.sku for item in items],
        [item.quantity for item in items],
        [item.unit_price_cents for item in items],
    )
