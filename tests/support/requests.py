"""Request builders: unique names, CreateOrder requests, orders to import,
and a client stream made of ready requests."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterable

from orderstream.orders.v1 import order_pb2, order_service_pb2


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def create_request(**overrides: object) -> order_service_pb2.CreateOrderRequest:
    fields: dict[str, object] = {
        "request_id": unique("req"),
        "customer_id": unique("cust"),
        "currency": "EUR",
        "items": [
            order_pb2.LineItem(sku="SKU-1", quantity=2, unit_price_cents=1250),
            order_pb2.LineItem(sku="SKU-2", quantity=1, unit_price_cents=99),
        ],
    }
    fields.update(overrides)
    return order_service_pb2.CreateOrderRequest(**fields)  # type: ignore[arg-type]


def order(**fields: object) -> order_pb2.Order:
    """An order as ImportOrders takes it."""
    values: dict[str, object] = {
        "customer_id": "cust-import",
        "currency": "EUR",
        "items": [order_pb2.LineItem(sku="SKU-1", quantity=2, unit_price_cents=1250)],
    }
    values.update(fields)
    return order_pb2.Order(**values)  # type: ignore[arg-type]


async def stream(requests: Iterable[object]) -> AsyncIterator[object]:
    """A client stream of ready-made requests."""
    for request in requests:
        yield request
