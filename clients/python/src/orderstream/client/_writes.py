"""The unary writes with an idempotency key always set, so that a retry
after a lost response returns the first result instead of writing again."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import grpc

from orderstream.client._target import backoff, event_stub, new_request_id, order_stub
from orderstream.events.v1.event_pb2 import Event
from orderstream.events.v1.event_service_pb2 import PublishEventsRequest
from orderstream.events.v1.event_service_pb2_grpc import EventServiceStub
from orderstream.orders.v1.order_pb2 import Order, OrderStatus
from orderstream.orders.v1.order_service_pb2 import CreateOrderRequest, UpdateOrderStatusRequest
from orderstream.orders.v1.order_service_pb2_grpc import OrderServiceStub

# Codes after which the call may or may not have taken effect, or was
# refused before doing anything, and a repeat with the same key is answered
# with the first result: worth another attempt.
_RETRIED = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED)


async def publish_events(
    target: EventServiceStub | grpc.aio.Channel,
    events: Iterable[Event],
    *,
    request_id: str | None = None,
    attempts: int = 5,
    timeout: float | None = 10.0,
) -> list[int]:
    """Publishes `events` (1..1000) in one PublishEvents call; returns their
    ids in order.

    The call always carries a `request_id` (a fresh one when None), and on
    UNAVAILABLE or ABORTED it is sent again with that same key, up to
    `attempts` times: the server answers a repeat with the first call's ids
    and writes nothing, so every event is stored exactly once. Other errors
    are raised as `grpc.aio.AioRpcError`.

        ids = await publish_events(channel, [Event(type="com.example.paid", source="/billing")])
    """
    if attempts < 1:
        raise ValueError("publish_events: attempts must be at least 1")
    stub = event_stub(target)
    request = PublishEventsRequest(
        request_id=request_id or new_request_id("publish"), events=list(events)
    )
    for attempt in range(1, attempts + 1):
        try:
            response = await stub.PublishEvents(request, timeout=timeout)
            return list(response.ids)
        except grpc.aio.AioRpcError as error:
            if error.code() not in _RETRIED or attempt == attempts:
                raise
        await asyncio.sleep(backoff(attempt))
    raise AssertionError("unreachable: the last attempt returns or raises")


async def create_order(
    target: OrderServiceStub | grpc.aio.Channel,
    request: CreateOrderRequest,
    *,
    timeout: float | None = None,
) -> Order:
    """CreateOrder with a fresh `request_id` when `request` has none (the
    server requires one); the channel's service config retries it.

        order = await create_order(channel, CreateOrderRequest(customer_id="c-42", ...))
    """
    if not request.request_id:
        keyed = CreateOrderRequest()
        keyed.CopyFrom(request)
        keyed.request_id = new_request_id("order")
        request = keyed
    order: Order = await order_stub(target).CreateOrder(request, timeout=timeout)
    return order


async def update_order_status(
    target: OrderServiceStub | grpc.aio.Channel,
    order_id: int,
    status: OrderStatus.ValueType,
    *,
    expected_version: int = 0,
    request_id: str | None = None,
    timeout: float | None = None,
) -> Order:
    """UpdateOrderStatus with a `request_id` (a fresh one when None), so that
    the service config's retry after a lost response is answered with the
    order as it now stands, not FAILED_PRECONDITION.

        paid = await update_order_status(channel, 42, ORDER_STATUS_PAID, expected_version=1)
    """
    request = UpdateOrderStatusRequest(
        id=order_id,
        status=status,
        expected_version=expected_version,
        request_id=request_id or new_request_id("status"),
    )
    order: Order = await order_stub(target).UpdateOrderStatus(request, timeout=timeout)
    return order
