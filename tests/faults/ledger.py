"""What callers were told about their writes, and the check that the
database agrees.

Each write is recorded with its idempotency key, the marker that finds its
rows (the customer id of an order or of imported orders, the subject of
published or uploaded events) and what the caller learnt:

- acknowledged (OK): present exactly once, as the response said;
- failed (a status that says nothing was written, or an upload whose
  stream the caller never closed, which the service must not commit):
  absent;
- unknown (UNAVAILABLE, DEADLINE_EXCEEDED, CANCELLED, ABORTED): settled the
  way a careful caller would, by retrying with the same key once the
  service is back and taking that answer; then present exactly once.
  Never guessed.

INTERNAL (or any other status) is a failure of its own: the service must
always say which of the three it is.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from orderstream.events.v1 import event_pb2, event_service_pb2, event_service_pb2_grpc
from orderstream.orders.v1 import order_pb2, order_service_pb2, order_service_pb2_grpc
from tests.faults.cluster import Admin

ACKNOWLEDGED, FAILED, UNKNOWN = "acknowledged", "failed", "unknown"

_NOTHING_WRITTEN = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,  # pool or stream slots: before any work
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
}
_OUTCOME_UNKNOWN = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.ABORTED,  # an upload with the same key still running
}
_RETRY_FOR = 90.0  # seconds a settling retry keeps trying while the service recovers


@dataclass
class Write:
    kind: str  # "order", "publish", "upload" or "import"
    key: str
    marker: str
    requests: Sequence[Any]
    outcome: str
    answer: Any = None
    code: grpc.StatusCode | None = None


@dataclass
class Totals:
    acknowledged: int = 0
    found_once: int = 0
    failed: int = 0
    failed_absent: int = 0
    unknown: int = 0
    unknown_resolved: int = 0

    def add(self, other: Totals) -> None:
        for name in vars(self):
            setattr(self, name, getattr(self, name) + getattr(other, name))


def outcome_of(code: grpc.StatusCode) -> str:
    if code == grpc.StatusCode.OK:
        return ACKNOWLEDGED
    if code in _NOTHING_WRITTEN:
        return FAILED
    if code in _OUTCOME_UNKNOWN:
        return UNKNOWN
    raise AssertionError(f"a write ended {code.name}: never an answer a caller can act on")


def order_request(key: str, customer_id: str = "", **overrides: Any) -> Any:
    fields: dict[str, Any] = {
        "request_id": key,
        "customer_id": customer_id or f"ledger/{key}",
        "currency": "EUR",
        "items": [order_pb2.LineItem(sku="SKU-F", quantity=1, unit_price_cents=500)],
        **overrides,
    }
    return order_service_pb2.CreateOrderRequest(**fields)


def publish_request(key: str, events: int, subject: str = "") -> Any:
    """A PublishEvents request keyed `key`: `events` events of one subject."""
    return event_service_pb2.PublishEventsRequest(
        request_id=key, events=upload_messages(key, events, events, subject)[0].events
    )


def upload_messages(key: str, events: int, per_message: int, subject: str = "") -> list[Any]:
    subject = subject or f"ledger/{key}"
    batches = [
        range(start, min(start + per_message, events)) for start in range(0, events, per_message)
    ]
    return [
        event_service_pb2.UploadEventsRequest(
            upload_id=key if n == 0 else "",
            events=[
                event_pb2.Event(
                    type="fault.test",
                    source="/faults",
                    subject=subject,
                    json_payload=f'{{"n": {i}}}',
                )
                for i in batch
            ],
        )
        for n, batch in enumerate(batches)
    ]


def import_messages(key: str, orders: int, per_message: int) -> list[Any]:
    batches = [
        range(start, min(start + per_message, orders)) for start in range(0, orders, per_message)
    ]
    return [
        order_service_pb2.ImportOrdersRequest(
            import_id=key if n == 0 else "",
            orders=[
                order_pb2.Order(
                    customer_id=f"ledger/{key}",
                    currency="EUR",
                    items=[order_pb2.LineItem(sku=f"IMP-{i}", quantity=1, unit_price_cents=i)],
                )
                for i in batch
            ],
        )
        for n, batch in enumerate(batches)
    ]


def marker_of(kind: str, key: str, requests: Sequence[Any]) -> str:
    if kind == "order":
        return str(requests[0].customer_id)
    if kind in ("publish", "upload"):
        return str(requests[0].events[0].subject) if requests[0].events else f"ledger/{key}"
    return f"ledger/{key}"


@dataclass
class Ledger:
    writes: list[Write] = field(default_factory=list)

    def record(
        self,
        kind: str,
        key: str,
        requests: Sequence[Any],
        code: grpc.StatusCode,
        answer: Any = None,
    ) -> str:
        outcome = outcome_of(code)
        self.writes.append(
            Write(kind, key, marker_of(kind, key, requests), requests, outcome, answer, code)
        )
        return outcome

    def record_not_committed(self, kind: str, key: str, requests: Sequence[Any]) -> None:
        """An upload or import whose request stream the caller never closed:
        the service commits a load only after a real end of stream
        (service/streams/loads.py confirm_end), so it must be absent."""
        self.writes.append(
            Write(
                kind,
                key,
                marker_of(kind, key, requests),
                requests,
                FAILED,
                None,
                grpc.StatusCode.CANCELLED,
            )
        )

    async def create_order(
        self, stub: order_service_pb2_grpc.OrderServiceStub, request: Any, *, timeout: float
    ) -> grpc.StatusCode:
        try:
            answer = await stub.CreateOrder(request, timeout=timeout)
        except grpc.aio.AioRpcError as error:
            self.record("order", request.request_id, [request], error.code())
            return error.code()
        self.record("order", request.request_id, [request], grpc.StatusCode.OK, answer)
        return grpc.StatusCode.OK

    async def publish(
        self, stub: event_service_pb2_grpc.EventServiceStub, request: Any, *, timeout: float
    ) -> grpc.StatusCode:
        try:
            answer = await stub.PublishEvents(request, timeout=timeout)
        except grpc.aio.AioRpcError as error:
            self.record("publish", request.request_id, [request], error.code())
            return error.code()
        self.record("publish", request.request_id, [request], grpc.StatusCode.OK, answer)
        return grpc.StatusCode.OK

    async def upload(
        self,
        stub: event_service_pb2_grpc.EventServiceStub,
        requests: Sequence[Any],
        *,
        timeout: float,
    ) -> grpc.StatusCode:
        key = requests[0].upload_id
        return await self._load("upload", stub.UploadEvents, key, requests, timeout)

    async def import_orders(
        self,
        stub: order_service_pb2_grpc.OrderServiceStub,
        requests: Sequence[Any],
        *,
        timeout: float,
    ) -> grpc.StatusCode:
        key = requests[0].import_id
        return await self._load("import", stub.ImportOrders, key, requests, timeout)

    async def _load(
        self, kind: str, method: Any, key: str, requests: Sequence[Any], timeout: float
    ) -> grpc.StatusCode:
        """One client-streamed load (UploadEvents or ImportOrders), recorded."""
        try:
            answer = await method(iter(requests), timeout=timeout)
        except grpc.aio.AioRpcError as error:
            self.record(kind, key, requests, error.code())
            return error.code()
        self.record(kind, key, requests, grpc.StatusCode.OK, answer)
        return grpc.StatusCode.OK

    async def settle(self, channel: grpc.aio.Channel, admin: Admin) -> Totals:
        """Resolves every unknown write by retrying it, then checks every
        write against the database; raises listing every disagreement."""
        orders = order_service_pb2_grpc.OrderServiceStub(channel)
        events = event_service_pb2_grpc.EventServiceStub(channel)
        totals = Totals()
        problems: list[str] = []
        for write in self.writes:
            if write.outcome == UNKNOWN:
                totals.unknown += 1
                write.answer = await _retry(write, orders, events)
            elif write.outcome == ACKNOWLEDGED:
                totals.acknowledged += 1
            else:
                totals.failed += 1
            problem = await _check(write, admin)
            if problem is not None:
                problems.append(
                    f"{write.kind} {write.key} ({write.outcome}, {write.code}): {problem}"
                )
            elif write.outcome == UNKNOWN:
                totals.unknown_resolved += 1
            elif write.outcome == ACKNOWLEDGED:
                totals.found_once += 1
            else:
                totals.failed_absent += 1
        assert not problems, "the ledger disagrees with the database:\n" + "\n".join(problems)
        return totals


async def _retry(
    write: Write,
    orders: order_service_pb2_grpc.OrderServiceStub,
    events: event_service_pb2_grpc.EventServiceStub,
) -> Any:
    """The same call with the same key until the service answers it."""
    deadline = time.monotonic() + _RETRY_FOR
    while True:
        try:
            if write.kind == "order":
                return await orders.CreateOrder(write.requests[0], timeout=20)
            if write.kind == "publish":
                return await events.PublishEvents(write.requests[0], timeout=20)
            if write.kind == "upload":
                return await events.UploadEvents(iter(write.requests), timeout=30)
            return await orders.ImportOrders(iter(write.requests), timeout=30)
        except grpc.aio.AioRpcError as error:
            if error.code() not in _OUTCOME_UNKNOWN or time.monotonic() > deadline:
                raise AssertionError(
                    f"retrying {write.kind} {write.key} ended {error.code().name}: "
                    f"{error.details()}"
                ) from None
            await asyncio.sleep(0.2)  # the service is still recovering; back off like a client


@dataclass(frozen=True)
class _Load:
    """Where a load's rows and its key record are found, the request field
    that carries the rows, and the response's (count, first id, last id)."""

    rows_sql: str
    key_sql: str
    items: str
    told: tuple[str, str, str]


_LOADS = {
    "upload": _Load(
        "SELECT count(*) AS n, min(id) AS first, max(id) AS last FROM events WHERE subject = $1",
        "SELECT event_count, first_event_id, last_event_id FROM uploads WHERE upload_id = $1",
        "events",
        ("event_count", "first_event_id", "last_event_id"),
    ),
    "import": _Load(
        "SELECT count(*) AS n, min(id) AS first, max(id) AS last FROM orders "
        "WHERE customer_id = $1",
        "SELECT order_count, first_order_id, last_order_id FROM imports WHERE import_id = $1",
        "orders",
        ("order_count", "first_order_id", "last_order_id"),
    ),
}


async def _check(write: Write, admin: Admin) -> str | None:
    present = write.outcome != FAILED
    if write.kind == "order":
        rows = await admin.fetch(
            "SELECT o.id, (SELECT count(*) FROM order_items i WHERE i.order_id = o.id) AS items "
            "FROM orders o WHERE o.request_id = $1",
            write.key,
        )
        if not present:
            return f"{len(rows)} orders found, expected none" if rows else None
        if len(rows) != 1:
            return f"{len(rows)} orders found, expected exactly one"
        if rows[0]["id"] != write.answer.id or rows[0]["items"] != len(write.requests[0].items):
            return f"stored order {dict(rows[0])} is not the acknowledged order {write.answer.id}"
        return None
    if write.kind == "publish":
        return await _check_publish(write, admin, present)
    load = _LOADS[write.kind]
    found = await admin.fetch(load.rows_sql, write.marker)
    key_rows = await admin.fetch(load.key_sql, write.key)
    sent = sum(len(getattr(r, load.items)) for r in write.requests)
    expected = tuple(getattr(write.answer, name) for name in load.told) if present else None
    n, first, last = found[0]["n"], found[0]["first"], found[0]["last"]
    if expected is None:
        return (
            f"{n} rows and {len(key_rows)} key records found, expected none"
            if n or key_rows
            else None
        )
    if expected[0] != sent:
        return f"acknowledged {expected[0]} rows, sent {sent}"
    if n != sent or (first, last) != expected[1:] or len(key_rows) != 1:
        return (
            f"found {n} rows ids {first}..{last} and {len(key_rows)} key records; told {expected}"
        )
    return None


async def _check_publish(write: Write, admin: Admin, present: bool) -> str | None:
    """Every event of the call stored once, with the ids the caller was
    told, and one record of its key holding them."""
    rows = await admin.fetch("SELECT id FROM events WHERE subject = $1 ORDER BY id", write.marker)
    stored = [r["id"] for r in rows]
    records = await admin.fetch(
        "SELECT event_ids FROM publish_requests WHERE request_id = $1", write.key
    )
    if not present:
        return (
            f"{len(stored)} events and {len(records)} key records found, expected none"
            if (stored or records)
            else None
        )
    told = list(write.answer.ids)
    recorded = [list(r["event_ids"]) for r in records]
    if stored != told or recorded != [told]:
        return f"found events {stored} and key records {recorded}; told {told}"
    return None
