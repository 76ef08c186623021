"""Scenario 2: pooled connections terminated by the server
(pg_terminate_backend), idle and in use. Scenario 4: every connection
reset (RST) mid-COPY and mid-cursor. Uploads cut before their commit leave
nothing visible; an export that lost its cursor ends with an error, not OK;
an event stream, which holds a connection only while it reads a page, goes
on with a fresh one or ends with an error, never OK short of its rows; the
next calls find fresh connections."""

from __future__ import annotations

import asyncio

import grpc

from orderstream.events.v1 import event_service_pb2
from orderstream.orders.v1 import order_service_pb2
from tests.faults.calls import FedStream, PausedStream, copy_running, ended_honestly
from tests.faults.history import EVENTS_SUBJECT, ORDERS_CUSTOMER
from tests.faults.ledger import import_messages, order_request, upload_messages
from tests.support.polling import eventually
from tests.support.requests import unique


def _event_stream(events) -> PausedStream:
    return PausedStream(
        events.StreamEvents(event_service_pb2.StreamEventsRequest(subject=EVENTS_SUBJECT)),
        "events",
    )


def _export(orders) -> PausedStream:
    return PausedStream(
        orders.ExportOrders(order_service_pb2.ExportOrdersRequest(customer_id=ORDERS_CUSTOMER)),
        "orders",
    )


async def test_idle_pooled_connections_terminated(scenario, admin, orders, events, history):
    # Fill the pool, then let every connection go idle.
    await asyncio.gather(
        *(
            orders.GetOrder(order_service_pb2.GetOrderRequest(id=order_id), timeout=10)
            for order_id in history.order_ids[:8]
        )
    )
    idle = [row["pid"] for row in await admin.service_backends() if row["state"] == "idle"]
    assert idle
    for pid in idle:
        assert await admin.terminate(pid)

    async def all_gone() -> bool:
        return not set(idle) & {row["pid"] for row in await admin.service_backends()}

    await eventually(all_gone, what="the terminated backends to exit")
    # Not one call fails for it: the pool drops the dead connections.
    for order_id in history.order_ids[:10]:
        await orders.GetOrder(order_service_pb2.GetOrderRequest(id=order_id), timeout=10)
    code = await scenario.ledger.create_order(orders, order_request(unique("idle")), timeout=10)
    assert code == grpc.StatusCode.OK
    stream = _event_stream(events)
    code = await stream.finish()
    assert code == grpc.StatusCode.OK
    ended_honestly(code, stream.ids, history.event_ids)


async def test_pooled_connections_terminated_in_use(scenario, admin, orders, events, history):
    stream = _export(orders)
    await stream.first()
    event_stream = _event_stream(events)
    await event_stream.first()
    key = unique("terminated")
    request = order_request(key, customer_id=f"gate:{key}")
    async with admin.gate(request.customer_id):
        creating = asyncio.ensure_future(scenario.ledger.create_order(orders, request, timeout=30))
        await eventually(admin.waiting_at_gate, what="the create to wait in its commit")
        # The paused export's backend sits idle in its read-only transaction;
        # the paused event stream holds none.
        busy = [
            row["pid"]
            for row in await admin.service_backends()
            if row["wait_event"] == "advisory" or row["state"] == "idle in transaction"
        ]
        assert len(busy) == 2
        for pid in busy:
            assert await admin.terminate(pid)
        assert await creating == grpc.StatusCode.UNAVAILABLE
    code = await stream.finish()
    ended_honestly(code, stream.ids, history.order_ids)
    assert code == grpc.StatusCode.UNAVAILABLE
    code = await event_stream.finish()
    ended_honestly(code, event_stream.ids, history.event_ids)
    assert code == grpc.StatusCode.OK
    code = await scenario.ledger.create_order(orders, order_request(unique("after")), timeout=10)
    assert code == grpc.StatusCode.OK


async def test_reset_mid_copy_leaves_no_partial_load(scenario, admin, proxy, orders, events):
    upload_key, import_key = unique("reset-upload"), unique("reset-import")
    upload_requests = upload_messages(upload_key, events=300, per_message=100)
    import_requests = import_messages(import_key, orders=300, per_message=100)
    upload = FedStream(events.UploadEvents)
    load = FedStream(orders.ImportOrders)
    upload.send(upload_requests[0])
    load.send(import_requests[0])

    async def both_copying() -> bool:
        rows = await admin.service_backends()
        return sum(1 for r in rows if (r["query"] or "").startswith("COPY")) == 2

    await eventually(both_copying, what="both COPYs to run")
    assert await copy_running(admin)
    proxy.cut()
    upload.send(*upload_requests[1:])
    load.send(*import_requests[1:])
    for key, requests, call, kind in (
        (upload_key, upload_requests, upload, "upload"),
        (import_key, import_requests, load, "import"),
    ):
        code, answer = await call.close()
        assert code == grpc.StatusCode.UNAVAILABLE
        scenario.ledger.record(kind, key, requests, code, answer)
    # Nothing of either load is visible before the ledger's retries.
    assert (
        await admin.fetchval(
            "SELECT count(*) FROM events WHERE subject = $1", f"ledger/{upload_key}"
        )
        == 0
    )
    assert (
        await admin.fetchval(
            "SELECT count(*) FROM orders WHERE customer_id = $1", f"ledger/{import_key}"
        )
        == 0
    )


async def test_reset_mid_cursor_ends_streams_with_an_error(
    scenario, proxy, orders, events, history
):
    event_stream, export = _event_stream(events), _export(orders)
    await event_stream.first()
    await export.first()
    proxy.cut()
    code = await export.finish()
    ended_honestly(code, export.ids, history.order_ids)
    assert code == grpc.StatusCode.UNAVAILABLE
    # A page in flight at the cut fails the stream; otherwise its next page
    # comes on a fresh connection.
    code = await event_stream.finish()
    ended_honestly(code, event_stream.ids, history.event_ids)
    assert code in (grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE)
    again = _export(orders)
    code = await again.finish()
    assert code == grpc.StatusCode.OK
    ended_honestly(code, again.ids, history.order_ids)
