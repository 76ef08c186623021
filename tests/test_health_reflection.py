"""Standard health (following the database) and server reflection."""

from __future__ import annotations

import secrets
from urllib.parse import quote

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from orderstream.orders.v1 import order_service_pb2, order_service_pb2_grpc
from service.app import SERVICE_NAMES
from tests.support.apps import app_with_channel
from tests.support.requests import create_request, unique
from tests.support.status import rpc_error

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.mark.parametrize("name", ["", *SERVICE_NAMES])
async def test_health_is_serving_for_the_server_and_each_service(health, name):
    response = await health.Check(health_pb2.HealthCheckRequest(service=name))
    assert response.status == SERVING


async def test_health_of_unknown_service_is_not_found(health):
    error = await rpc_error(health.Check(health_pb2.HealthCheckRequest(service="no.Such")))
    assert error.code == grpc.StatusCode.NOT_FOUND


async def test_reflection_lists_both_services_and_health(channel):
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = stub.ServerReflectionInfo()
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    response = await call.read()
    await call.done_writing()
    names = {s.name for s in response.list_services_response.service}
    assert {*SERVICE_NAMES, "grpc.health.v1.Health"} <= names


async def test_reflection_describes_a_method_without_proto_files(channel):
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = stub.ServerReflectionInfo()
    await call.write(
        reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="orderstream.orders.v1.OrderService"
        )
    )
    response = await call.read()
    await call.done_writing()
    assert response.file_descriptor_response.file_descriptor_proto


async def test_health_follows_the_database(service_env, pg_cluster, admin_db, orders):
    """A service instance whose database login stops working goes NOT_SERVING,
    and SERVING again once it works, without a restart."""
    await orders.CreateOrder(create_request())  # so that order 1 exists
    role, password = unique("probe").replace("-", "_"), secrets.token_urlsafe(16)
    await admin_db.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
    await admin_db.execute(f"GRANT {pg_cluster.app_user} TO {role}")
    try:
        url = (
            f"postgresql://{role}:{quote(password)}@{pg_cluster.host}:{pg_cluster.port}/"
            f"{pg_cluster.database}"
        )
        async with app_with_channel(
            service_env,
            DATABASE_URL=url,
            ORDERSTREAM_MIGRATE_ON_START="false",
            ORDERSTREAM_POOL_ACQUIRE_TIMEOUT="1",
        ) as (_, channel):
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
            assert (await watch.read()).status == SERVING

            await admin_db.execute(f"ALTER ROLE {role} NOLOGIN")
            await admin_db.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", role
            )
            assert (await watch.read()).status == NOT_SERVING
            orders = order_service_pb2_grpc.OrderServiceStub(channel)
            error = await rpc_error(orders.GetOrder(order_service_pb2.GetOrderRequest(id=1)))
            assert error.code == grpc.StatusCode.UNAVAILABLE
            assert error.error_info.reason == "DATABASE_UNAVAILABLE"
            assert error.retry_info is not None

            await admin_db.execute(f"ALTER ROLE {role} LOGIN")
            assert (await watch.read()).status == SERVING
            await orders.GetOrder(order_service_pb2.GetOrderRequest(id=1))
            watch.cancel()
    finally:
        await admin_db.execute(f"DROP ROLE IF EXISTS {role}")
