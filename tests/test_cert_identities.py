"""Client certificates mapped to scopes, over real mTLS: a call without a
token is served as the caller its certificate names in
ORDERSTREAM_AUTH_CERT_IDENTITIES_FILE, with that caller's scopes; a
certificate the CA signed but the file does not name is UNAUTHENTICATED; a
token, when sent, decides instead. The server runs without the development
switch: certificate identities are caller authentication."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from devcluster.cluster import Certificates, make_certificates
from orderstream.events.v1 import event_pb2, event_service_pb2, event_service_pb2_grpc
from orderstream.orders.v1 import order_service_pb2, order_service_pb2_grpc
from service.app import App
from service.errors import StartupError
from service.settings import Settings, SettingsError
from tests.support.apps import closed, running_app
from tests.support.client_identity import ClientIdentity, client_identity
from tests.support.database import table_counts
from tests.support.polling import eventually
from tests.support.requests import create_request, unique
from tests.support.status import rpc_error
from tests.support.tokens import TokenSet, bearer, write_tokens_file

WRITER_URI = "spiffe://prod/ns/billing/sa/billing"


@pytest.fixture(scope="module")
def server_certs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Certificates]:
    yield make_certificates(tmp_path_factory.mktemp("identities-tls"), hosts=("127.0.0.1",))


@pytest.fixture(scope="module")
def reader() -> ClientIdentity:
    return client_identity("reporting-reader")


@pytest.fixture(scope="module")
def writer() -> ClientIdentity:
    return client_identity("billing-writer", uris=(WRITER_URI,))


@pytest.fixture(scope="module")
def stranger() -> ClientIdentity:
    """Signed by a CA the server trusts, named nowhere in the identities file."""
    return client_identity("stranger")


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> TokenSet:
    return write_tokens_file(tmp_path_factory.mktemp("identities-tokens"))


@pytest.fixture(scope="module")
def mtls_env(
    tmp_path_factory: pytest.TempPathFactory,
    server_certs: Certificates,
    reader: ClientIdentity,
    writer: ClientIdentity,
    stranger: ClientIdentity,
) -> dict[str, str]:
    directory = tmp_path_factory.mktemp("identities")
    client_ca = directory / "client-ca.crt"
    client_ca.write_bytes(reader.ca_cert + writer.ca_cert + stranger.ca_cert)
    identities = directory / "identities"
    identities.write_text(
        "# name     scopes  identity\n"
        "reporting  read    subject:CN=reporting-reader\n"
        f"billing    write   uri:{WRITER_URI}   # a SPIFFE id\n"
    )
    return {
        "ORDERSTREAM_TLS_CERT": str(server_certs.server_cert),
        "ORDERSTREAM_TLS_KEY": str(server_certs.server_key),
        "ORDERSTREAM_TLS_CLIENT_CA": str(client_ca),
        "ORDERSTREAM_AUTH_CERT_IDENTITIES_FILE": str(identities),
    }


@pytest.fixture(scope="module")
async def mtls_app(
    service_env: dict[str, str], mtls_env: dict[str, str], tokens: TokenSet
) -> AsyncIterator[App]:
    """Both kinds of caller: certificates (no development switch) and tokens."""
    env = {**closed(service_env), **mtls_env, "ORDERSTREAM_AUTH_TOKENS_FILE": str(tokens.file)}
    async with running_app(env) as app:
        yield app


def channel_as(app: App, certs: Certificates, identity: ClientIdentity) -> grpc.aio.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=certs.ca_cert.read_bytes(),
        private_key=identity.key,
        certificate_chain=identity.cert,
    )
    return grpc.aio.secure_channel(f"127.0.0.1:{app.port}", credentials)


async def upload(channel: grpc.aio.Channel, metadata=()) -> object:
    stub = event_service_pb2_grpc.EventServiceStub(channel)

    async def messages():
        yield event_service_pb2.UploadEventsRequest(
            upload_id=unique("cert-upload"),
            events=[
                event_pb2.Event(type="com.example.cert", source="/identities", json_payload="{}")
            ],
        )

    return await stub.UploadEvents(messages(), metadata=metadata, timeout=5)


async def test_a_certificate_with_the_scope_is_served(mtls_app, server_certs, reader, writer):
    async with channel_as(mtls_app, server_certs, writer) as channel:
        orders = order_service_pb2_grpc.OrderServiceStub(channel)
        order = await orders.CreateOrder(create_request(), timeout=5)
        assert (await upload(channel)).event_count == 1  # type: ignore[attr-defined]
    async with channel_as(mtls_app, server_certs, reader) as channel:
        orders = order_service_pb2_grpc.OrderServiceStub(channel)
        got = await orders.GetOrder(order_service_pb2.GetOrderRequest(id=order.id), timeout=5)
        assert got.id == order.id
        events = event_service_pb2_grpc.EventServiceStub(channel)
        page = await _first(events.StreamEvents(event_service_pb2.StreamEventsRequest(), timeout=5))
        assert page is not None and len(page.events) > 0  # type: ignore[attr-defined]


async def test_a_certificate_without_the_scope_is_denied_and_writes_nothing(
    mtls_app, server_certs, reader, admin_db
):
    before = await table_counts(admin_db)
    async with channel_as(mtls_app, server_certs, reader) as channel:
        orders = order_service_pb2_grpc.OrderServiceStub(channel)
        denied = await rpc_error(orders.CreateOrder(create_request(), timeout=5))
        streamed = await rpc_error(upload(channel))
    for status in (denied, streamed):
        assert status.code == grpc.StatusCode.PERMISSION_DENIED
        assert status.error_info is not None
        assert status.error_info.reason == "SCOPE_MISSING"
        assert status.error_info.metadata["caller"] == "reporting"
        assert status.error_info.metadata["scope"] == "write"
        assert "certificate" in status.message
    assert await table_counts(admin_db) == before


async def test_a_certificate_the_file_does_not_name_is_unauthenticated(
    mtls_app, server_certs, stranger, admin_db
):
    """Today's hole: a valid client certificate with no token could write."""
    before = await table_counts(admin_db)
    async with channel_as(mtls_app, server_certs, stranger) as channel:
        orders = order_service_pb2_grpc.OrderServiceStub(channel)
        events = event_service_pb2_grpc.EventServiceStub(channel)
        created = await rpc_error(orders.CreateOrder(create_request(), timeout=5))
        streamed = await rpc_error(
            _first(events.StreamEvents(event_service_pb2.StreamEventsRequest(), timeout=5))
        )
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
    for status in (created, streamed):
        assert status.code == grpc.StatusCode.UNAUTHENTICATED
        assert status.error_info is not None
        assert status.error_info.reason == "CERTIFICATE_UNKNOWN"
        assert status.error_info.metadata["subject"] == "CN=stranger"
    assert await table_counts(admin_db) == before
    assert health.status == health_pb2.HealthCheckResponse.SERVING  # health stays open


async def _first(call: grpc.aio.UnaryStreamCall) -> object:
    async for response in call:
        return response
    return None


async def test_reflection_needs_a_known_certificate(mtls_app, server_certs, reader, stranger):
    request = reflection_pb2.ServerReflectionRequest(list_services="")

    async def services(identity: ClientIdentity) -> object:
        async with channel_as(mtls_app, server_certs, identity) as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            async for response in stub.ServerReflectionInfo(iter([request]), timeout=5):
                return {s.name for s in response.list_services_response.service}
        return None

    assert "orderstream.orders.v1.OrderService" in await services(reader)  # type: ignore[operator]
    refused = await rpc_error(services(stranger))
    assert refused.code == grpc.StatusCode.UNAUTHENTICATED


async def test_a_token_decides_over_the_certificate(mtls_app, server_certs, reader, tokens):
    async with channel_as(mtls_app, server_certs, reader) as channel:
        orders = order_service_pb2_grpc.OrderServiceStub(channel)
        # The reader's certificate cannot write; the writer's token can.
        order = await orders.CreateOrder(create_request(), metadata=bearer(tokens.writer))
        assert order.id > 0
        # An unknown token is refused, not passed over for the certificate.
        unknown = await rpc_error(
            orders.GetOrder(
                order_service_pb2.GetOrderRequest(id=order.id), metadata=bearer("nope" * 8)
            )
        )
    assert unknown.code == grpc.StatusCode.UNAUTHENTICATED
    assert unknown.error_info is not None and unknown.error_info.reason == "TOKEN_UNKNOWN"


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ("billing write", "expected 'NAME SCOPES KIND:IDENTITY'"),
        ("billing write cn:billing", "the identity must be one of"),
        ("billing root uri:spiffe://x", "scopes must be"),
        ("bill/ing read uri:spiffe://x", "the name must be"),
    ],
)
async def test_a_bad_identities_file_stops_startup_naming_the_line(
    service_env, mtls_env, tmp_path, line, fragment
):
    identities = tmp_path / "identities"
    identities.write_text(f"# first\n{line}\n")
    env = {
        **closed(service_env),
        **mtls_env,
        "ORDERSTREAM_AUTH_CERT_IDENTITIES_FILE": str(identities),
    }
    with pytest.raises(StartupError) as raised:
        async with running_app(env):
            pass
    assert f"{identities} line 2" in str(raised.value)
    assert fragment in str(raised.value)


def test_identities_need_mtls(service_env, tmp_path: Path):
    with pytest.raises(SettingsError, match="ORDERSTREAM_TLS_CLIENT_CA"):
        Settings.from_env(
            {**service_env, "ORDERSTREAM_AUTH_CERT_IDENTITIES_FILE": str(tmp_path / "identities")}
        )


async def test_a_changed_identities_file_takes_effect_without_a_restart(
    service_env, mtls_env, server_certs, stranger, tmp_path
):
    identities = tmp_path / "identities"
    identities.write_text("reporting read subject:CN=reporting-reader\n")
    env = {
        **closed(service_env),
        **mtls_env,
        "ORDERSTREAM_AUTH_CERT_IDENTITIES_FILE": str(identities),
    }
    async with running_app(env) as app, channel_as(app, server_certs, stranger) as channel:
        orders = order_service_pb2_grpc.OrderServiceStub(channel)
        missing = order_service_pb2.GetOrderRequest(id=2**62)
        refused = await rpc_error(orders.GetOrder(missing, timeout=5))
        assert refused.error_info is not None
        assert refused.error_info.reason == "CERTIFICATE_UNKNOWN"
        identities.write_text("stranger read subject:CN=stranger\n")
        app.reload_now()

        async def admitted() -> bool:
            # Admitted, the call reaches the handler: NOT_FOUND.
            status = await rpc_error(orders.GetOrder(missing, timeout=5))
            return status.code == grpc.StatusCode.NOT_FOUND

        await eventually(admitted, what="the new identities file to take effect")
