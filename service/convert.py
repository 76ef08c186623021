"""Database rows to protobuf messages, and protobuf timestamps to the
integer microseconds the pool's codec speaks (see service/database.py)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from orderstream.events.v1 import event_pb2
from orderstream.orders.v1 import order_pb2

STATUS_NAMES: dict[int, str] = {
    order_pb2.ORDER_STATUS_PENDING: "PENDING",
    order_pb2.ORDER_STATUS_PAID: "PAID",
    order_pb2.ORDER_STATUS_SHIPPED: "SHIPPED",
    order_pb2.ORDER_STATUS_DELIVERED: "DELIVERED",
    order_pb2.ORDER_STATUS_CANCELLED: "CANCELLED",
}
STATUS_VALUES: dict[str, int] = {name: value for value, name in STATUS_NAMES.items()}


def timestamp(unix_us: int) -> Timestamp:
    seconds, micros = divmod(unix_us, 1_000_000)
    return Timestamp(seconds=seconds, nanos=micros * 1000)


def unix_micros(ts: Timestamp) -> int:
    """Truncates to PostgreSQL's microsecond resolution."""
    return ts.seconds * 1_000_000 + ts.nanos // 1000


def order_from_row(row: Mapping[str, Any]) -> order_pb2.Order:
    return order_pb2.Order(
        id=row["id"],
        customer_id=row["customer_id"],
        currency=row["currency"],
        status=STATUS_VALUES[row["status"]],  # type: ignore[arg-type]
        items=[
            order_pb2.LineItem(sku=sku, quantity=quantity, unit_price_cents=price)
            for sku, quantity, price in zip(
                row["skus"], row["quantities"], row["prices"], strict=True
            )
        ],
        total_cents=row["total_cents"],
        version=row["version"],
        create_time=timestamp(row["create_time"]),
        update_time=timestamp(row["update_time"]),
    )


def event_from_row(row: Mapping[str, Any]) -> event_pb2.Event:
    return event_pb2.Event(
        id=row["id"],
        type=row["type"],
        source=row["source"],
        subject=row["subject"],
        time=timestamp(row["time"]),
        json_payload=row["payload"],
    )
