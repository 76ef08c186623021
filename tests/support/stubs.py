"""The `orders`, `events` and `health` stub fixtures, for whichever plugin
or conftest provides the `channel` they are built on."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2_grpc

from orderstream.events.v1 import event_service_pb2_grpc
from orderstream.orders.v1 import order_service_pb2_grpc


def stub_fixtures() -> tuple[
    Callable[[grpc.aio.Channel], order_service_pb2_grpc.OrderServiceStub],
    Callable[[grpc.aio.Channel], event_service_pb2_grpc.EventServiceStub],
    Callable[[grpc.aio.Channel], health_pb2_grpc.HealthStub],
]:
    """New session fixtures each call: assign them to `orders, events,
    health` in the module that declares them (pytest finds fixtures by the
    module's attributes). Each declaration caches its own stubs."""

    @pytest.fixture(scope="session")
    def orders(channel: grpc.aio.Channel) -> order_service_pb2_grpc.OrderServiceStub:
        return order_service_pb2_grpc.OrderServiceStub(channel)

    @pytest.fixture(scope="session")
    def events(channel: grpc.aio.Channel) -> event_service_pb2_grpc.EventServiceStub:
        return event_service_pb2_grpc.EventServiceStub(channel)

    @pytest.fixture(scope="session")
    def health(channel: grpc.aio.Channel) -> health_pb2_grpc.HealthStub:
        return health_pb2_grpc.HealthStub(channel)

    return orders, events, health
