"""Limits that are settings, each enforced with its status: the largest
request message (RESOURCE_EXHAUSTED naming the message, nothing written), concurrent RPCs
(RESOURCE_EXHAUSTED), and reflection that production turns off."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from orderstream.events.v1 import event_pb2, event_service_pb2, event_service_pb2_grpc
from orderstream.orders.v1 import order_pb2, order_service_pb2, order_service_pb2_grpc
from service.settings import Settings, SettingsError
from tests.support.apps import app_with_channel
from tests.support.database import backends_running, row_locked, table_counts
from tests.support.polling import eventually
from tests.support.requests import create_request, unique
from tests.support.status import rpc_error

LIMIT = 8192


def assert_too_large(error, field: str) -> None:
    """RESOURCE_EXHAUSTED from the service, naming the message and the limit."""
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.error_info.reason == "MESSAGE_TOO_LARGE"
    assert error.error_info.metadata["max_bytes"] == str(LIMIT)
    assert list(error.violations) == [field]


def event_of(size: int) -> event_pb2.Event:
    padding = "x" * size
    return event_pb2.Event(
        type="com.example.limit", source="/limits", json_payload=f'{{"pad": "{padding}"}}'
    )


async def requests(messages: list[object]):
    for message in messages:
        yield message


@pytest.fixture(scope="module")
async def small_messages(service_env):
    async with (
        app_with_channel(service_env, ORDERSTREAM_MAX_MESSAGE_BYTES=str(LIMIT)) as (_, channel),
    ):
        yield channel


async def test_a_message_under_the_limit_is_served(small_messages):
    stub = event_service_pb2_grpc.EventServiceStub(small_messages)
    request = event_service_pb2.PublishEventsRequest(events=[event_of(LIMIT - 200)])
    assert request.ByteSize() < LIMIT
    assert len((await stub.PublishEvents(request)).ids) == 1


async def test_a_unary_message_over_the_limit_is_resource_exhausted(small_messages, admin_db):
    stub = event_service_pb2_grpc.EventServiceStub(small_messages)
    request = event_service_pb2.PublishEventsRequest(events=[event_of(LIMIT)])
    before = await table_counts(admin_db)
    error = await rpc_error(stub.PublishEvents(request))
    assert_too_large(error, "request")
    assert await table_counts(admin_db) == before


async def test_a_message_over_twice_the_limit_is_refused_by_grpc_unread(small_messages):
    """gRPC's own limit (twice the setting) refuses it before the service
    sees it, so there are no details: the memory bound holds regardless."""
    stub = event_service_pb2_grpc.EventServiceStub(small_messages)
    request = event_service_pb2.PublishEventsRequest(events=[event_of(2 * LIMIT)])
    error = await rpc_error(stub.PublishEvents(request))
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.error_info is None


async def test_one_oversized_message_in_an_upload_aborts_it(small_messages, admin_db):
    stub = event_service_pb2_grpc.EventServiceStub(small_messages)
    upload_id = unique("upload")
    messages = [
        event_service_pb2.UploadEventsRequest(upload_id=upload_id, events=[event_of(100)] * 3),
        event_service_pb2.UploadEventsRequest(events=[event_of(LIMIT)]),
    ]
    before = await table_counts(admin_db)
    error = await rpc_error(stub.UploadEvents(requests(messages)))
    assert_too_large(error, "messages[1]")
    assert await table_counts(admin_db) == before
    stored = await admin_db.fetchval("SELECT count(*) FROM uploads WHERE upload_id = $1", upload_id)
    assert stored == 0


async def test_an_oversized_import_message_is_resource_exhausted(small_messages, admin_db):
    stub = order_service_pb2_grpc.OrderServiceStub(small_messages)
    item = order_pb2.LineItem(sku="S" * 100, quantity=1, unit_price_cents=1)
    order = order_pb2.Order(customer_id="c", currency="EUR", items=[item] * 100)
    message = order_service_pb2.ImportOrdersRequest(import_id=unique("imp"), orders=[order])
    assert message.ByteSize() > LIMIT
    before = await table_counts(admin_db)
    assert message.ByteSize() < 2 * LIMIT
    error = await rpc_error(stub.ImportOrders(requests([message])))
    assert_too_large(error, "messages[0]")
    assert await table_counts(admin_db) == before


async def test_calls_over_the_concurrency_limit_are_resource_exhausted(
    service_env, orders, admin_db
):
    """Two calls held on a row lock fill ORDERSTREAM_MAX_CONCURRENT_RPCS=2;
    a third is refused at once, with details, and counted; once they finish,
    calls are served again."""
    order = await orders.CreateOrder(create_request())
    async with app_with_channel(service_env, ORDERSTREAM_MAX_CONCURRENT_RPCS="2") as (
        app,
        channel,
    ):
        stub = order_service_pb2_grpc.OrderServiceStub(channel)
        get = order_service_pb2.GetOrderRequest(id=order.id)
        async with row_locked(admin_db, order.id):
            held = [
                asyncio.ensure_future(
                    stub.UpdateOrderStatus(
                        order_service_pb2.UpdateOrderStatusRequest(id=order.id, status=status),
                        timeout=60,
                    )
                )
                for status in (order_pb2.ORDER_STATUS_PAID, order_pb2.ORDER_STATUS_CANCELLED)
            ]

            async def both_waiting() -> bool:
                return await backends_running(admin_db, "orders_update_status(") == 2

            await eventually(both_waiting, what="two updates waiting on the lock")
            error = await rpc_error(stub.GetOrder(get))
            assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert error.error_info is not None
            assert error.error_info.reason == "TOO_MANY_RPCS"
            assert error.error_info.metadata["limit"] == "2"
            assert error.retry_info is not None
            refused = app.metrics.registry.get_sample_value(
                "orderstream_refused_calls_total", {"reason": "TOO_MANY_RPCS"}
            )
            assert refused == 1
        await asyncio.gather(*held, return_exceptions=True)
        assert (await stub.GetOrder(get)).id == order.id


async def list_services(channel: grpc.aio.Channel) -> set[str]:
    call = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo()
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    response = await call.read()
    await call.done_writing()
    return {service.name for service in response.list_services_response.service}


async def test_reflection_can_be_turned_off(service_env):
    async with app_with_channel(service_env, ORDERSTREAM_REFLECTION="false") as (_, channel):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await list_services(channel)
        assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
        stub = order_service_pb2_grpc.OrderServiceStub(channel)
        order = await stub.CreateOrder(create_request())
        assert (await stub.GetOrder(order_service_pb2.GetOrderRequest(id=order.id))).id == order.id
        check = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert check.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_is_on_by_default(channel):
    assert "orderstream.orders.v1.OrderService" in await list_services(channel)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("ORDERSTREAM_MAX_MESSAGE_BYTES", "100"),
        ("ORDERSTREAM_MAX_CONCURRENT_RPCS", "0"),
        ("ORDERSTREAM_REFLECTION", "maybe"),
    ],
)
def test_bad_limit_settings_name_the_variable(service_env, name, value):
    with pytest.raises(SettingsError, match=name):
        Settings.from_env({**service_env, name: value})
