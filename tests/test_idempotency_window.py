"""Idempotency records expire: every kind of key (CreateOrder's and
PublishEvents' and UpdateOrderStatus' request_id, upload_id, import_id) is
forgotten once older than ORDERSTREAM_IDEMPOTENCY_WINDOW, in bounded batches,
by a task the service runs on its own; records inside the window stay."""

from __future__ import annotations

import pytest

from orderstream.events.v1 import event_pb2, event_service_pb2, event_service_pb2_grpc
from orderstream.orders.v1 import order_pb2, order_service_pb2, order_service_pb2_grpc
from service.db.expiry import forget_expired
from service.settings import Settings, SettingsError
from tests.support.apps import app_with_channel
from tests.support.polling import eventually
from tests.support.requests import create_request, unique

DAY = 86_400.0
# (table, key column) of every kind of idempotency record.
RECORDS = {
    "order": ("orders", "request_id"),
    "publish": ("publish_requests", "request_id"),
    "status": ("status_requests", "request_id"),
    "upload": ("uploads", "upload_id"),
    "import": ("imports", "import_id"),
}


def settings_with(service_env: dict[str, str], **values: str) -> Settings:
    return Settings.from_env({**service_env, **values})


def test_the_window_defaults_to_a_day_and_accepts_up_to_90_days(service_env):
    assert settings_with(service_env).idempotency_window == DAY
    assert settings_with(service_env).idempotency_cleanup_interval == 60.0
    week = settings_with(service_env, ORDERSTREAM_IDEMPOTENCY_WINDOW="604800")
    assert week.idempotency_window == 7 * DAY


@pytest.mark.parametrize("value", ["60", "7776000", "day"])
def test_a_window_under_an_hour_or_from_90_days_is_refused(service_env, value):
    with pytest.raises(SettingsError, match="ORDERSTREAM_IDEMPOTENCY_WINDOW"):
        settings_with(service_env, ORDERSTREAM_IDEMPOTENCY_WINDOW=value)


async def keyed_writes(orders, events) -> dict[str, str]:
    """One write of every keyed kind; their keys by kind."""
    keys = {kind: unique(f"expiry-{kind}-") for kind in RECORDS}
    order = await orders.CreateOrder(create_request(request_id=keys["order"]))
    await orders.UpdateOrderStatus(
        order_service_pb2.UpdateOrderStatusRequest(
            id=order.id, status=order_pb2.ORDER_STATUS_PAID, request_id=keys["status"]
        )
    )
    event = event_pb2.Event(type="expiry.test", source="/tests", json_payload="{}")
    await events.PublishEvents(
        event_service_pb2.PublishEventsRequest(request_id=keys["publish"], events=[event])
    )
    await events.UploadEvents(
        iter([event_service_pb2.UploadEventsRequest(upload_id=keys["upload"], events=[event])])
    )
    imported = order_pb2.Order(customer_id="expiry", currency="EUR", items=create_request().items)
    await orders.ImportOrders(
        iter([order_service_pb2.ImportOrdersRequest(import_id=keys["import"], orders=[imported])])
    )
    return keys


async def backdate(admin_db, keys: dict[str, str], seconds: float) -> None:
    for kind, key in keys.items():
        table, column = RECORDS[kind]
        await admin_db.execute(
            f"UPDATE {table} SET create_time = now() - make_interval(secs => $2) "
            f"WHERE {column} = $1",
            key,
            seconds,
        )


async def remembered(admin_db, keys: dict[str, str]) -> set[str]:
    found = set()
    for kind, key in keys.items():
        table, column = RECORDS[kind]
        if await admin_db.fetchval(f"SELECT count(*) FROM {table} WHERE {column} = $1", key):
            found.add(kind)
    return found


async def test_records_past_the_window_are_forgotten_in_batches(orders, events, admin_db):
    expired = await keyed_writes(orders, events)
    kept = await keyed_writes(orders, events)
    await backdate(admin_db, expired, 2 * DAY)
    await backdate(admin_db, kept, DAY - 600)

    orders_before = await admin_db.fetchval("SELECT count(*) FROM orders")

    forgotten = await forget_expired(admin_db, DAY, batch_rows=1)
    assert all(forgotten[table] >= 1 for table, _ in RECORDS.values())
    assert await remembered(admin_db, expired) == set()
    assert await remembered(admin_db, kept) == set(RECORDS)
    # Orders stay; only their keys are forgotten.
    assert await admin_db.fetchval("SELECT count(*) FROM orders") == orders_before


async def test_the_service_forgets_expired_records_on_its_own(service_env, admin_db):
    async with app_with_channel(service_env, ORDERSTREAM_IDEMPOTENCY_CLEANUP_INTERVAL="0.2") as (
        _app,
        channel,
    ):
        orders = order_service_pb2_grpc.OrderServiceStub(channel)
        events = event_service_pb2_grpc.EventServiceStub(channel)
        keys = await keyed_writes(orders, events)
        publish = event_service_pb2.PublishEventsRequest(
            request_id=unique("expiry-again-"),
            events=[event_pb2.Event(type="expiry.test", source="/tests", json_payload="{}")],
        )
        first = await events.PublishEvents(publish)
        keys["publish"] = publish.request_id
        await backdate(admin_db, keys, 2 * DAY)

        async def all_forgotten() -> bool:
            return not await remembered(admin_db, keys)

        await eventually(all_forgotten, what="expired idempotency records to be forgotten")
        # A forgotten key is a new key: the same request writes anew.
        again = await events.PublishEvents(publish)
        assert set(again.ids).isdisjoint(first.ids)
