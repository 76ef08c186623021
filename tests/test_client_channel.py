"""create_channel's TLS, mTLS and retry policy, against small grpc.aio
servers started here (real sockets, real certificates): the service's own
TLS listener is configured elsewhere."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from devcluster.cluster import Certificates, make_ca_only, make_certificates
from orderstream.client import DEFAULT_SERVICE_CONFIG, create_channel, publish_events
from orderstream.events.v1 import event_pb2, event_service_pb2, event_service_pb2_grpc
from orderstream.orders.v1 import order_pb2, order_service_pb2, order_service_pb2_grpc
from tests.support.client_identity import client_identity

SERVING = health_pb2.HealthCheckResponse.SERVING


@pytest.fixture(scope="module")
def server_certs(tmp_path_factory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("server"), common_name="test server CA")


@dataclass(frozen=True)
class ClientCertificates:
    ca_cert: Path
    cert: Path
    key: Path


@pytest.fixture(scope="module")
def client_certs(tmp_path_factory) -> ClientCertificates:
    """A client CA and a clientAuth certificate it signed, as files."""
    folder = tmp_path_factory.mktemp("client")
    identity = client_identity("orderstream-client")
    found = ClientCertificates(folder / "ca.crt", folder / "client.crt", folder / "client.key")
    found.ca_cert.write_bytes(identity.ca_cert)
    found.cert.write_bytes(identity.cert)
    found.key.write_bytes(identity.key)
    return found


@contextlib.asynccontextmanager
async def tls_health_server(
    certs: Certificates, *, client_ca: Path | None = None
) -> AsyncIterator[str]:
    """Serves grpc.health.v1 over TLS on a free port; requires a client
    certificate signed by `client_ca` when given. Yields the target."""
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    credentials = grpc.ssl_server_credentials(
        [(certs.server_key.read_bytes(), certs.server_cert.read_bytes())],
        root_certificates=client_ca.read_bytes() if client_ca else None,
        require_client_auth=client_ca is not None,
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(grace=None)


async def check(channel: grpc.aio.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    response = await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
    return response.status


async def test_tls_with_the_right_ca(server_certs):
    async with (
        tls_health_server(server_certs) as target,
        create_channel(target, ca_file=server_certs.ca_cert) as channel,
    ):
        assert await check(channel) == SERVING


async def test_tls_with_a_wrong_ca_fails(server_certs, tmp_path):
    wrong = make_ca_only(tmp_path, "someone else")
    async with (
        tls_health_server(server_certs) as target,
        create_channel(target, ca_file=wrong) as channel,
    ):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await check(channel)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_mtls_with_a_client_certificate(server_certs, client_certs):
    async with (
        tls_health_server(server_certs, client_ca=client_certs.ca_cert) as target,
        create_channel(
            target,
            ca_file=server_certs.ca_cert,
            client_cert_file=client_certs.cert,
            client_key_file=client_certs.key,
        ) as channel,
    ):
        assert await check(channel) == SERVING


async def test_mtls_without_a_client_certificate_fails(server_certs, client_certs):
    async with (
        tls_health_server(server_certs, client_ca=client_certs.ca_cert) as target,
        create_channel(target, ca_file=server_certs.ca_cert) as channel,
    ):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await check(channel)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE


class FlakyOrders:
    """OrderService methods that fail with a given code a given number of
    times, then answer; counts attempts."""

    def __init__(self, failures: dict[str, tuple[grpc.StatusCode, int]]) -> None:
        self.failures = failures
        self.attempts = dict.fromkeys(failures, 0)

    def handler(self, method: str) -> grpc.RpcMethodHandler:
        request_type: Callable[[bytes], object] = getattr(
            order_service_pb2, f"{method}Request"
        ).FromString

        async def answer(request: object, context: grpc.aio.ServicerContext) -> order_pb2.Order:
            self.attempts[method] += 1
            code, times = self.failures[method]
            if self.attempts[method] <= times:
                await context.abort(code, "try again")
            return order_pb2.Order(id=7)

        return grpc.unary_unary_rpc_method_handler(
            answer,
            request_deserializer=request_type,
            response_serializer=order_pb2.Order.SerializeToString,
        )


@contextlib.asynccontextmanager
async def serving(service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> AsyncIterator[str]:
    """A bare grpc.aio server with `handlers` for `service`; yields its address."""
    server = grpc.aio.server()
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(service, handlers)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(grace=None)


def flaky_server(orders: FlakyOrders) -> contextlib.AbstractAsyncContextManager[str]:
    handlers = {name: orders.handler(name) for name in orders.failures}
    return serving("orderstream.orders.v1.OrderService", handlers)


async def test_retry_policy_retries_what_is_safe_to_retry():
    orders = FlakyOrders(
        {
            "GetOrder": (grpc.StatusCode.ABORTED, 2),
            "CreateOrder": (grpc.StatusCode.ABORTED, 1),
            "UpdateOrderStatus": (grpc.StatusCode.UNAVAILABLE, 1),
        }
    )
    async with flaky_server(orders) as target, create_channel(target, insecure=True) as channel:
        stub = order_service_pb2_grpc.OrderServiceStub(channel)
        assert (await stub.GetOrder(order_service_pb2.GetOrderRequest(id=7))).id == 7
        assert (await stub.CreateOrder(order_service_pb2.CreateOrderRequest())).id == 7
        assert (await stub.UpdateOrderStatus(order_service_pb2.UpdateOrderStatusRequest())).id == 7
    assert orders.attempts == {"GetOrder": 3, "CreateOrder": 2, "UpdateOrderStatus": 2}


async def test_retry_policy_does_not_repeat_a_conditional_update():
    orders = FlakyOrders({"UpdateOrderStatus": (grpc.StatusCode.ABORTED, 1)})
    async with flaky_server(orders) as target, create_channel(target, insecure=True) as channel:
        stub = order_service_pb2_grpc.OrderServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.UpdateOrderStatus(order_service_pb2.UpdateOrderStatusRequest())
    assert raised.value.code() == grpc.StatusCode.ABORTED
    assert orders.attempts == {"UpdateOrderStatus": 1}


# Every method of both services -> the status codes the default service
# config retries. Only methods idempotent by contract are retried: a retry
# after a lost response repeats a call that may have taken effect.
RETRIED = {
    "orderstream.orders.v1.OrderService/GetOrder": {"UNAVAILABLE", "ABORTED"},
    "orderstream.orders.v1.OrderService/ListOrders": {"UNAVAILABLE", "ABORTED"},
    # request_id is required: a repeat returns the first order.
    "orderstream.orders.v1.OrderService/CreateOrder": {"UNAVAILABLE", "ABORTED"},
    # No status is entered twice; ABORTED (a stale expected_version) needs a re-read.
    "orderstream.orders.v1.OrderService/UpdateOrderStatus": {"UNAVAILABLE"},
    "orderstream.orders.v1.OrderService/ExportOrders": {"UNAVAILABLE"},
    "orderstream.orders.v1.OrderService/ImportOrders": {"UNAVAILABLE"},  # import_id required
    "orderstream.events.v1.EventService/GetEvent": {"UNAVAILABLE", "ABORTED"},
    # request_id is optional: without one a repeat writes twice (publish_events retries).
    "orderstream.events.v1.EventService/PublishEvents": set(),
    "orderstream.events.v1.EventService/UploadEvents": {"UNAVAILABLE"},  # upload_id required
    "orderstream.events.v1.EventService/StreamEvents": {"UNAVAILABLE"},
    # A position never moves backwards: a repeated acknowledgement changes nothing.
    "orderstream.events.v1.EventService/AckEvents": {"UNAVAILABLE", "ABORTED"},
    "orderstream.events.v1.EventService/ListConsumers": {"UNAVAILABLE", "ABORTED"},
    "orderstream.events.v1.EventService/GetConsumer": {"UNAVAILABLE", "ABORTED"},
    # Sets a position: a repeat sets the same one.
    "orderstream.events.v1.EventService/ResetConsumer": {"UNAVAILABLE", "ABORTED"},
}


def test_the_retry_table_retries_only_methods_idempotent_by_contract():
    configured: dict[str, set[str]] = {}
    for method_config in DEFAULT_SERVICE_CONFIG["methodConfig"]:
        codes = set(method_config.get("retryPolicy", {}).get("retryableStatusCodes", ()))
        for name in method_config["name"]:
            path = f"{name['service']}/{name['method']}"
            assert path not in configured, f"{path} is configured twice"
            configured[path] = codes
    every_method = {
        f"{service.full_name}/{method.name}"
        for module in (order_service_pb2, event_service_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }
    assert set(RETRIED) == every_method, "classify every method of the contract"
    assert configured == RETRIED


class FlakyPublish:
    """PublishEvents that fails UNAVAILABLE a given number of times, then
    answers; records the request_id of every attempt."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.request_ids: list[str] = []

    async def publish(
        self, request: event_service_pb2.PublishEventsRequest, context: grpc.aio.ServicerContext
    ) -> event_service_pb2.PublishEventsResponse:
        self.request_ids.append(request.request_id)
        if len(self.request_ids) <= self.failures:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "try again")
        return event_service_pb2.PublishEventsResponse(ids=[41, 42])


def flaky_publish_server(flaky: FlakyPublish) -> contextlib.AbstractAsyncContextManager[str]:
    handler = grpc.unary_unary_rpc_method_handler(
        flaky.publish,
        request_deserializer=event_service_pb2.PublishEventsRequest.FromString,
        response_serializer=event_service_pb2.PublishEventsResponse.SerializeToString,
    )
    return serving("orderstream.events.v1.EventService", {"PublishEvents": handler})


async def test_a_raw_publish_is_not_retried_by_the_channel():
    flaky = FlakyPublish(failures=1)
    async with flaky_publish_server(flaky) as target, create_channel(target, insecure=True) as ch:
        stub = event_service_pb2_grpc.EventServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.PublishEvents(event_service_pb2.PublishEventsRequest())
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert flaky.request_ids == [""]


async def test_publish_events_retries_with_one_request_id():
    flaky = FlakyPublish(failures=2)
    async with flaky_publish_server(flaky) as target, create_channel(target, insecure=True) as ch:
        assert await publish_events(ch, [event_pb2.Event(type="t", source="/s")]) == [41, 42]
    assert len(flaky.request_ids) == 3
    assert len(set(flaky.request_ids)) == 1
    assert flaky.request_ids[0]
