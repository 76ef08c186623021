"""The two client-streamed loads, UploadEvents and ImportOrders, as the tests
see them: one `Loader` each, so that tests/test_loads.py runs every behaviour
the loads share against both, and other tests build their requests the
same way."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import grpc
from google.protobuf import struct_pb2
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from orderstream.events.v1 import event_pb2, event_service_pb2, event_service_pb2_grpc
from orderstream.orders.v1 import order_pb2, order_service_pb2, order_service_pb2_grpc
from tests.support.requests import order, stream

Item = order_pb2.LineItem


def event(**fields: object) -> event_pb2.Event:
    values: dict[str, object] = {
        "type": "com.example.uploaded",
        "source": "/tests/uploads",
        "subject": "things/1",
        "json_payload": '{"n": 1}',
    }
    values.update(fields)
    return event_pb2.Event(**values)  # type: ignore[arg-type]


# 997 bytes as sent, 110 numbers that jsonb writes out in full as 131072
# digits each: 13.8 MiB back to every reader. Short enough that UploadEvents
# leaves it to PostgreSQL, whose size CHECK must refuse it.
POISON_PAYLOAD = '{"x":[' + ",".join(["1e131071"] * 110) + "]}"
# Just under 1 MiB as sent, with no number to grow, and about 1.5 MiB as
# jsonb writes it out (`1,` becomes `1, `): only the database sees it.
SPACED_OUT_PAYLOAD = '{"a":[' + ",".join(["1"] * 524_280) + "]}"


def in_messages(
    count: int, per_message: int, item: Callable[[int], Message]
) -> list[list[Message]]:
    """`count` items, item(i) the i-th of the stream, in messages of `per_message`."""
    return [[item(first + n) for n in range(per_message)] for first in range(0, count, per_message)]


# (fields of the bad event, the field its violation names): the ones
# tests/test_events.py sends through PublishEvents.
BAD_EVENT_KINDS: list[tuple[dict[str, object], str]] = [
    ({"type": ""}, "type"),
    ({"type": "a\x00b"}, "type"),
    ({"type": "t" * 257}, "type"),
    ({"source": ""}, "source"),
    ({"subject": "s\x00"}, "subject"),
    ({"time": Timestamp(seconds=253_402_300_800)}, "time"),
    ({"time": Timestamp(seconds=-62_135_596_801)}, "time"),
    ({"json_payload": ""}, "json_payload"),
    ({"json_payload": "{"}, "json_payload"),
    ({"json_payload": "[1, 2]"}, "json_payload"),
    ({"json_payload": '"text"'}, "json_payload"),
    ({"json_payload": '{"x": NaN}'}, "json_payload"),
    ({"json_payload": '{"x": Infinity}'}, "json_payload"),
    ({"json_payload": '{"x": "\\u0000"}'}, "json_payload"),
    ({"json_payload": '{"\\u0000": 1}'}, "json_payload"),
    ({"json_payload": '{"x": "\\ud800"}'}, "json_payload"),
    ({"json_payload": "[" * 100_000 + "]" * 100_000}, "json_payload"),
    ({"json_payload": '{"a":' * 5000 + "1" + "}" * 5000}, "json_payload"),
    (
        {
            "struct_payload": struct_pb2.Struct(
                fields={"x": struct_pb2.Value(number_value=float("nan"))}
            )
        },
        "struct_payload",
    ),
    # Small as sent, over 1 MiB as jsonb writes the numbers out; the same
    # with a Struct; and under 1 MiB as sent and in numbers, over it with
    # jsonb's spaces (every write path refuses these: no poison events).
    ({"json_payload": POISON_PAYLOAD}, "json_payload"),
    ({"json_payload": SPACED_OUT_PAYLOAD}, "json_payload"),
    (
        {
            "struct_payload": struct_pb2.Struct(
                fields={
                    "x": struct_pb2.Value(
                        list_value=struct_pb2.ListValue(
                            values=[struct_pb2.Value(number_value=1e300)] * 4000
                        )
                    )
                }
            )
        },
        "struct_payload",
    ),
]

# The loads are sent those and more. Each kind is caught either by
# PostgreSQL during COPY or by the service before it.
BAD_EVENTS: list[tuple[dict[str, object], str]] = [
    *BAD_EVENT_KINDS,
    ({"source": "/s\x00"}, "source"),
    ({"source": "s" * 1025}, "source"),
    ({"subject": "s" * 1025}, "subject"),
    ({"time": Timestamp(seconds=0, nanos=-1)}, "time"),
    ({"json_payload": '{"x": "a\x00"}'}, "json_payload"),
    ({"json_payload": '{"x": 1} trailing'}, "json_payload"),
    ({"json_payload": '{"x": "' + "y" * 2000 + '"'}, "json_payload"),
    ({"json_payload": json.dumps({"x": "y" * (1 << 20)})}, "json_payload"),
    # Under the limit in characters, over it in bytes.
    ({"json_payload": json.dumps({"x": "é" * 600_000}, ensure_ascii=False)}, "json_payload"),
    # 24 KB as sent; over 1 MiB as PostgreSQL writes the numbers out.
    ({"json_payload": '{"x": [' + ",".join(["1e300"] * 4000) + "]}"}, "json_payload"),
]

# Events that forge the service's own (service/events/origin.py): (fields,
# the field named, the PERMISSION_DENIED reason). Refused whoever calls.
FORGED_EVENTS: list[tuple[dict[str, str], str, str]] = [
    ({"type": "order.created"}, "type", "RESERVED_EVENT_TYPE"),
    ({"type": "order.status_changed"}, "type", "RESERVED_EVENT_TYPE"),
    ({"type": "order."}, "type", "RESERVED_EVENT_TYPE"),
    ({"type": "order.x\x00"}, "type", "RESERVED_EVENT_TYPE"),
    ({"source": "orderstream"}, "source", "RESERVED_EVENT_SOURCE"),
    ({"type": "order.created", "source": "orderstream"}, "type", "RESERVED_EVENT_TYPE"),
]
RESERVED_REASONS = frozenset(reason for _, _, reason in FORGED_EVENTS)

BAD_ORDERS: list[tuple[dict[str, object], str]] = [
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


@dataclass(frozen=True)
class Loader:
    """One client-streamed load: its request, its stub method, what its
    response counts, and where its rows and its stored key end up."""

    rpc: str  # "UploadEvents"
    service: str  # the gRPC service's full name
    stub: Callable[[grpc.aio.Channel], Any]
    request_type: type[Message]
    key_name: str  # the request field with the idempotency key: "upload_id"
    items: str  # the repeated request field that is loaded: "events"
    count_field: str  # the response's count of loaded items: "event_count"
    key_table: str  # where a committed key is stored: "uploads"
    item: Callable[..., Message]  # a valid item, with the given fields set
    # An item field each test sets to a value of its own, and the table it
    # lands in under the same column name: finds the test's rows.
    tag_field: str
    tag_table: str
    bad_items: Sequence[tuple[dict[str, object], str]]  # (fields, the field named)
    # Bad items whose place in a long load of uneven messages must be found:
    # for uploads, one PostgreSQL rejects and one the service does.
    far_bad_items: Sequence[tuple[dict[str, object], str]]

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.rpc}"

    @property
    def in_progress(self) -> str:
        """The ErrorInfo reason while another load with the key runs."""
        return f"{self.key_name.removesuffix('_id').upper()}_IN_PROGRESS"

    def method(self, channel: grpc.aio.Channel) -> Any:
        return getattr(self.stub(channel), self.rpc)

    def request(self, key: str = "", items: Iterable[Message] = ()) -> Any:
        return self.request_type(**{self.key_name: key, self.items: items})

    def messages(self, key: str, batches: Iterable[Sequence[Message]]) -> list[Any]:
        """One request per batch; only the first carries the key."""
        return [self.request(key if n == 0 else "", batch) for n, batch in enumerate(batches)]

    def tagged(self, tag: str) -> Message:
        return self.item(**{self.tag_field: tag})

    def count(self, response: Any) -> int:
        return int(getattr(response, self.count_field))

    @property
    def id_range_fields(self) -> tuple[str, str, str]:
        """The response's fields: the count, the first id and the last id."""
        kind = self.count_field.removesuffix("_count")
        return self.count_field, f"first_{kind}_id", f"last_{kind}_id"

    def id_range(self, response: Any) -> tuple[int, int, int]:
        count, first, last = (getattr(response, name) for name in self.id_range_fields)
        return count, first, last

    async def load(self, channel: grpc.aio.Channel, requests: Iterable[Any], **kwargs: Any) -> Any:
        return await self.method(channel)(stream(requests), **kwargs)

    async def tagged_rows(self, db: asyncpg.Pool, tag: str) -> int:
        return int(
            await db.fetchval(
                f"SELECT count(*) FROM {self.tag_table} WHERE {self.tag_field} = $1", tag
            )
        )

    async def tagged_id_range(self, db: asyncpg.Pool, tag: str) -> tuple[int, int, int]:
        """(count, smallest id, largest id) of the rows tagged `tag`."""
        found = await db.fetchrow(
            f"SELECT count(*), min(id), max(id) FROM {self.tag_table} WHERE {self.tag_field} = $1",
            tag,
        )
        return found[0], found[1], found[2]

    async def stored(self, db: asyncpg.Pool, key: str) -> asyncpg.Record | None:
        return await db.fetchrow(f"SELECT * FROM {self.key_table} WHERE {self.key_name} = $1", key)


UPLOAD = Loader(
    rpc="UploadEvents",
    service="orderstream.events.v1.EventService",
    stub=event_service_pb2_grpc.EventServiceStub,
    request_type=event_service_pb2.UploadEventsRequest,
    key_name="upload_id",
    items="events",
    count_field="event_count",
    key_table="uploads",
    item=event,
    tag_field="source",
    tag_table="events",
    bad_items=BAD_EVENTS,
    far_bad_items=[
        ({"json_payload": "[]"}, "json_payload"),
        ({"json_payload": POISON_PAYLOAD}, "json_payload"),
        ({"time": Timestamp(seconds=2**40)}, "time"),
    ],
)

IMPORT = Loader(
    rpc="ImportOrders",
    service="orderstream.orders.v1.OrderService",
    stub=order_service_pb2_grpc.OrderServiceStub,
    request_type=order_service_pb2.ImportOrdersRequest,
    key_name="import_id",
    items="orders",
    count_field="order_count",
    key_table="imports",
    item=order,
    tag_field="customer_id",
    tag_table="orders",
    bad_items=BAD_ORDERS,
    far_bad_items=[
        ({"items": [Item(sku="A", quantity=1), Item(sku="B", quantity=-3)]}, "items[1].quantity")
    ],
)

LOADERS = (UPLOAD, IMPORT)
