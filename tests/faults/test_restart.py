"""Scenario 1: PostgreSQL restarts (fast: backends told to stop; immediate:
killed, crash recovery on start) while unary, streaming and upload calls
run. In-flight calls end UNAVAILABLE, never OK with part of the data;
health goes NOT_SERVING, then SERVING again; the same process serves new
calls afterwards."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from orderstream.events.v1 import event_service_pb2
from orderstream.orders.v1 import order_service_pb2
from tests.faults.calls import (
    NOT_SERVING,
    SERVING,
    FedStream,
    HealthWatch,
    PausedStream,
    copy_running,
    ended_honestly,
    unary_loop,
)
from tests.faults.history import EVENTS_SUBJECT, ORDERS_CUSTOMER
from tests.faults.ledger import order_request, upload_messages
from tests.support.polling import eventually
from tests.support.requests import unique


@pytest.mark.parametrize("mode", ["fast", "immediate"])
async def test_postgres_restart_mid_calls(
    mode, scenario, fault_cluster, admin, orders, events, health, history
):
    ledger = scenario.ledger
    watch = HealthWatch(health)
    await watch.saw(SERVING)

    event_stream = PausedStream(
        events.StreamEvents(event_service_pb2.StreamEventsRequest(subject=EVENTS_SUBJECT)),
        "events",
    )
    export = PausedStream(
        orders.ExportOrders(order_service_pb2.ExportOrdersRequest(customer_id=ORDERS_CUSTOMER)),
        "orders",
    )
    # Whatever fails below, the calls this test opened end with it: left
    # open, they would hold the shared service away from rest for the
    # scenarios after this one.
    stop = asyncio.Event()
    try:
        await event_stream.first()
        await export.first()

        upload_key = unique("restart-upload")
        upload_requests = upload_messages(upload_key, events=30, per_message=10)
        upload = FedStream(events.UploadEvents)
        upload.send(upload_requests[0])
        await eventually(lambda: copy_running(admin), what="the upload's COPY to start")

        create_key = unique("restart-create")
        create = order_request(create_key, customer_id=f"gate:{create_key}")
        async with admin.gate(create.customer_id):
            creating = asyncio.ensure_future(ledger.create_order(orders, create, timeout=60))
            await eventually(admin.waiting_at_gate, what="the create to wait in its commit")

            reads = asyncio.ensure_future(
                unary_loop(
                    lambda: orders.GetOrder(
                        order_service_pb2.GetOrderRequest(id=history.order_ids[0]), timeout=10
                    ),
                    stop,
                )
            )
            await fault_cluster.stop(mode)
            # Down until health has said so: an outage shorter than the check
            # interval would otherwise pass unseen (and the test would race).
            await watch.saw(SERVING, NOT_SERVING)
            await fault_cluster.start()

        upload.send(*upload_requests[1:])
        upload_code, upload_answer = await upload.close()
        ledger.record("upload", upload_key, upload_requests, upload_code, upload_answer)
        assert upload_code == grpc.StatusCode.UNAVAILABLE
        # The create waited inside its commit when the server went down, and
        # fails UNAVAILABLE; unless the gate's session ended before the create's
        # own backend took its signal to stop (a fast shutdown signals every
        # backend at once, in no set order), when it commits first. The ledger
        # holds it to exactly once either way.
        assert await creating in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.OK)
        code = await export.finish()
        ended_honestly(code, export.ids, history.order_ids)
        assert code == grpc.StatusCode.UNAVAILABLE  # its snapshot died with the server
        # The event stream holds a connection only while it reads a page: it
        # goes on after the restart, or fails a page it was reading; never OK
        # short of its rows.
        code = await event_stream.finish()
        ended_honestly(code, event_stream.ids, history.event_ids)
        assert code in (grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE)

        await watch.saw(SERVING, NOT_SERVING, SERVING)
        await watch.close()
        stop.set()
        assert set(await reads) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}

        # Recovered, with no restart of the service.
        assert await ledger.create_order(orders, order_request(unique("after")), timeout=10) == (
            grpc.StatusCode.OK
        )
        again = PausedStream(
            events.StreamEvents(event_service_pb2.StreamEventsRequest(subject=EVENTS_SUBJECT)),
            "events",
        )
        code = await again.finish()
        assert code == grpc.StatusCode.OK
        ended_honestly(code, again.ids, history.event_ids)
    finally:
        stop.set()
        event_stream.cancel()
        export.cancel()
