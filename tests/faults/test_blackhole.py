"""Scenario 3: the network to PostgreSQL stalls (sockets open, bytes
dropped). A call of every RPC ends within its deadline, health turns NOT_SERVING,
SIGTERM still stops a process within a bound, and the service serves again
once traffic flows."""

from __future__ import annotations

import asyncio

import grpc

from orderstream.events.v1 import event_service_pb2
from orderstream.orders.v1 import order_pb2, order_service_pb2, order_service_pb2_grpc
from tests.faults.calls import NOT_SERVING, SERVING, FedStream, HealthWatch, PausedStream
from tests.faults.history import EVENTS_SUBJECT, ORDERS_CUSTOMER
from tests.faults.ledger import import_messages, order_request, publish_request, upload_messages
from tests.faults.service import channel_to, running_process
from tests.support.requests import unique

DEADLINE = 3.0
# How late a call may end after its deadline on this loaded machine: the
# property is "no hang", not latency.
SLACK = 10.0
# ORDERSTREAM_SHUTDOWN_GRACE (3 s, tests/faults/service.py) bounds the
# drain and again the pool's close; the rest is process start-up slack.
SHUTDOWN_BOUND = 30.0


async def _ends_within_deadline(call) -> grpc.StatusCode:
    """The status `call` ends with (a call, or a helper that returns a
    status or a (status, answer) pair); fails if it outlives its deadline."""
    async with asyncio.timeout(DEADLINE + SLACK):
        try:
            result = await call
        except grpc.aio.AioRpcError as error:
            return error.code()
    if isinstance(result, tuple):
        result = result[0]
    return result if isinstance(result, grpc.StatusCode) else grpc.StatusCode.OK


async def test_blackhole(scenario, proxy, fault_env, orders, events, health, history):
    ledger = scenario.ledger
    async with running_process(fault_env) as doomed, channel_to(doomed.target) as doomed_channel:
        doomed_stub = order_service_pb2_grpc.OrderServiceStub(doomed_channel)
        watch = HealthWatch(health)
        await watch.saw(SERVING)
        # Written before the stall, for the update to change during it.
        to_pay = order_request(unique("to-pay"))
        assert await ledger.create_order(orders, to_pay, timeout=10) == grpc.StatusCode.OK
        to_pay_id = ledger.writes[-1].answer.id
        proxy.blackhole()

        upload_key = unique("blackholed-upload")
        upload_requests = upload_messages(upload_key, events=20, per_message=10)
        upload = FedStream(events.UploadEvents, timeout=DEADLINE)
        upload.send(*upload_requests)
        # One call of every RPC, each with the same deadline.
        calls = {
            "GetOrder": orders.GetOrder(
                order_service_pb2.GetOrderRequest(id=history.order_ids[0]), timeout=DEADLINE
            ),
            "ListOrders": orders.ListOrders(
                order_service_pb2.ListOrdersRequest(customer_id=ORDERS_CUSTOMER, page_size=10),
                timeout=DEADLINE,
            ),
            "CreateOrder": ledger.create_order(
                orders, order_request(unique("blackholed")), timeout=DEADLINE
            ),
            "UpdateOrderStatus": orders.UpdateOrderStatus(
                order_service_pb2.UpdateOrderStatusRequest(
                    id=to_pay_id, status=order_pb2.ORDER_STATUS_PAID
                ),
                timeout=DEADLINE,
            ),
            "ExportOrders": PausedStream(
                orders.ExportOrders(
                    order_service_pb2.ExportOrdersRequest(customer_id=ORDERS_CUSTOMER),
                    timeout=DEADLINE,
                ),
                "orders",
            ).finish(timeout=DEADLINE + SLACK),
            "ImportOrders": ledger.import_orders(
                orders,
                import_messages(unique("blackholed-import"), orders=20, per_message=10),
                timeout=DEADLINE,
            ),
            "GetEvent": events.GetEvent(
                event_service_pb2.GetEventRequest(id=history.event_ids[0]), timeout=DEADLINE
            ),
            "PublishEvents": ledger.publish(
                events, publish_request(unique("blackholed-publish"), 3), timeout=DEADLINE
            ),
            "StreamEvents": PausedStream(
                events.StreamEvents(
                    event_service_pb2.StreamEventsRequest(subject=EVENTS_SUBJECT),
                    timeout=DEADLINE,
                ),
                "events",
            ).finish(timeout=DEADLINE + SLACK),
            "UploadEvents": upload.close(timeout=DEADLINE + SLACK),
            "GetOrder (another process)": doomed_stub.GetOrder(
                order_service_pb2.GetOrderRequest(id=history.order_ids[0]), timeout=DEADLINE
            ),
        }
        ended = dict(
            zip(
                calls,
                await asyncio.gather(*(_ends_within_deadline(call) for call in calls.values())),
                strict=True,
            )
        )
        ledger.record("upload", upload_key, upload_requests, ended["UploadEvents"])
        codes = list(ended.values())
        # RESOURCE_EXHAUSTED: the pool's connections are all stuck in the
        # stall (a new one that cannot open is UNAVAILABLE,
        # tests/test_connect_stall.py).
        stalled = {
            grpc.StatusCode.DEADLINE_EXCEEDED,
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        }
        # A stalled database answers nothing: a call ending OK would mean
        # the blackhole leaked (the stream may have had its first rows).
        assert set(codes) <= stalled, ended
        await watch.saw(SERVING, NOT_SERVING)

        # SIGTERM while a call waits on the stalled database.
        pending = asyncio.ensure_future(
            _ends_within_deadline(
                doomed_stub.GetOrder(order_service_pb2.GetOrderRequest(id=1), timeout=DEADLINE)
            )
        )
        doomed.terminate()
        assert await doomed.child.exit_code(timeout=SHUTDOWN_BOUND) == 0
        # Cancelled by the server when the grace ran out, or ended by its deadline.
        assert await pending in stalled | {grpc.StatusCode.CANCELLED}

    proxy.resume()
    await watch.saw(SERVING, NOT_SERVING, SERVING)
    await watch.close()
    # Serving again: more calls than the pool has connections, so every
    # connection that lived through the blackhole is used or replaced.
    for order_id in history.order_ids[:20]:
        await orders.GetOrder(order_service_pb2.GetOrderRequest(id=order_id), timeout=10)
    assert (
        await ledger.create_order(orders, order_request(unique("resumed")), timeout=10)
        == grpc.StatusCode.OK
    )
