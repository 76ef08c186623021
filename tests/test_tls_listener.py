"""TLS and mTLS on the gRPC listener with real certificates: the server's
from devcluster.cluster, client certificates from
tests/support/client_identity.py. Health for probes stays reachable in
plain text on its own port."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devcluster.cluster import Certificates, make_certificates
from orderstream.orders.v1 import order_service_pb2_grpc
from service.errors import StartupError
from tests.support.apps import running_app
from tests.support.client_identity import ClientIdentity, client_identity
from tests.support.requests import create_request
from tests.support.status import rpc_error

SERVING = health_pb2.HealthCheckResponse.SERVING


@pytest.fixture(scope="module")
def server_certs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Certificates]:
    yield make_certificates(tmp_path_factory.mktemp("listener-tls"), hosts=("127.0.0.1",))


@pytest.fixture(scope="module")
def caller() -> ClientIdentity:
    return client_identity("orders-caller")


def tls_env(certs: Certificates, client_ca: Path | None = None) -> dict[str, str]:
    env = {
        "ORDERSTREAM_TLS_CERT": str(certs.server_cert),
        "ORDERSTREAM_TLS_KEY": str(certs.server_key),
        "ORDERSTREAM_HEALTH_PORT": "0",
    }
    if client_ca is not None:
        env["ORDERSTREAM_TLS_CLIENT_CA"] = str(client_ca)
    return env


def credentials(certs: Certificates, identity: ClientIdentity | None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=certs.ca_cert.read_bytes(),
        private_key=identity.key if identity else None,
        certificate_chain=identity.cert if identity else None,
    )


async def create_over(port: int, creds: grpc.ChannelCredentials) -> object:
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds) as channel:
        stub = order_service_pb2_grpc.OrderServiceStub(channel)
        return await stub.CreateOrder(create_request(), timeout=5)


async def health_in_plain_text(port: int, service: str = "") -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        response = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
    return response.status


async def test_tls_listener_serves_verified_callers_and_plain_text_health(
    service_env, server_certs
):
    async with running_app(service_env, **tls_env(server_certs)) as app:
        order = await create_over(app.port, credentials(server_certs, None))
        assert order.id > 0  # type: ignore[attr-defined]
        # Plain text on the TLS port fails; the probe port answers.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            stub = order_service_pb2_grpc.OrderServiceStub(channel)
            plain = await rpc_error(stub.CreateOrder(create_request(), timeout=5))
        assert plain.code == grpc.StatusCode.UNAVAILABLE
        assert app.health_port is not None and app.health_port != app.port
        assert await health_in_plain_text(app.health_port) == SERVING
        assert await health_in_plain_text(app.health_port, "liveness") == SERVING
        # The probe port serves health only.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.health_port}") as channel:
            stub = order_service_pb2_grpc.OrderServiceStub(channel)
            only_health = await rpc_error(stub.CreateOrder(create_request(), timeout=5))
        assert only_health.code == grpc.StatusCode.UNIMPLEMENTED


async def test_mtls_requires_a_certificate_from_the_client_ca(
    service_env, server_certs, caller, tmp_path
):
    client_ca = tmp_path / "client-ca.crt"
    client_ca.write_bytes(caller.ca_cert)
    async with running_app(service_env, **tls_env(server_certs, client_ca)) as app:
        # A valid client certificate gets through.
        order = await create_over(app.port, credentials(server_certs, caller))
        assert order.id > 0  # type: ignore[attr-defined]
        # No client certificate: the handshake fails.
        with pytest.raises(grpc.aio.AioRpcError) as no_cert:
            await create_over(app.port, credentials(server_certs, None))
        assert no_cert.value.code() == grpc.StatusCode.UNAVAILABLE
        # A certificate from another CA: refused the same way.
        stranger = client_identity("stranger")
        with pytest.raises(grpc.aio.AioRpcError) as other_ca:
            await create_over(app.port, credentials(server_certs, stranger))
        assert other_ca.value.code() == grpc.StatusCode.UNAVAILABLE
        assert await health_in_plain_text(app.health_port or 0) == SERVING


async def test_unreadable_key_stops_startup(service_env, server_certs, tmp_path):
    env = {**tls_env(server_certs), "ORDERSTREAM_TLS_KEY": str(tmp_path / "missing.key")}
    with pytest.raises(StartupError, match="cannot read the listener's private key"):
        async with running_app(service_env, **env):
            pass


async def test_a_key_of_another_certificate_stops_startup(service_env, server_certs, tmp_path):
    other = make_certificates(tmp_path / "other", hosts=("127.0.0.1",))
    env = {**tls_env(server_certs), "ORDERSTREAM_TLS_KEY": str(other.server_key)}
    with pytest.raises(StartupError, match="do not load together"):
        async with running_app(service_env, **env):
            pass
