"""Caller authentication: bearer tokens with per-method scopes, checked by
an interceptor that exists only when ORDERSTREAM_AUTH_TOKENS_FILE is set.

Unary, server-streaming and client-streaming calls are refused alike:
UNAUTHENTICATED without a valid token, PERMISSION_DENIED without the
method's scope, never echoing the token, and a refused write writes nothing.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from devcluster.cluster import make_certificates
from orderstream.client import create_channel
from orderstream.events.v1 import event_pb2, event_service_pb2, event_service_pb2_grpc
from orderstream.orders.v1 import order_pb2, order_service_pb2, order_service_pb2_grpc
from service.app import EVENT_SERVICE, ORDER_SERVICE, App, _interceptors, _watched_tokens
from service.errors import StartupError
from service.ops.metrics import Metrics
from service.rpc import auth
from service.rpc.auth import METHOD_SCOPES, SCOPES, TokenAuth, Tokens
from service.settings import Settings
from tests.support.apps import app_with_channel, running_app
from tests.support.database import table_counts
from tests.support.requests import create_request, unique
from tests.support.shell import run_shell
from tests.support.status import StatusDetails, details, rpc_error
from tests.support.tokens import TokenSet, bearer, digest, write_tokens_file

SERVING = health_pb2.HealthCheckResponse.SERVING
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> TokenSet:
    return write_tokens_file(tmp_path_factory.mktemp("auth"))


@pytest.fixture(scope="module")
async def auth_app(service_env: dict[str, str], tokens: TokenSet) -> AsyncIterator[App]:
    async with running_app(service_env, ORDERSTREAM_AUTH_TOKENS_FILE=str(tokens.file)) as app:
        yield app


@pytest.fixture(scope="module")
async def auth_channel(auth_app: App) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{auth_app.port}") as channel:
        yield channel


async def requests(messages: list[object]) -> AsyncIterator[object]:
    for message in messages:
        yield message


Metadata = tuple[tuple[str, str], ...]
# How to make one call with the given metadata; `order_id` names an order
# that exists.
Call = Callable[[grpc.aio.Channel, Metadata, int], Awaitable[object]]


async def get_order(channel: grpc.aio.Channel, metadata: Metadata, order_id: int) -> object:
    stub = order_service_pb2_grpc.OrderServiceStub(channel)
    return await stub.GetOrder(order_service_pb2.GetOrderRequest(id=order_id), metadata=metadata)


async def create_order(channel: grpc.aio.Channel, metadata: Metadata, _: int) -> object:
    stub = order_service_pb2_grpc.OrderServiceStub(channel)
    return await stub.CreateOrder(create_request(), metadata=metadata)


async def stream_events(channel: grpc.aio.Channel, metadata: Metadata, _: int) -> object:
    stub = event_service_pb2_grpc.EventServiceStub(channel)
    call = stub.StreamEvents(
        event_service_pb2.StreamEventsRequest(subject=unique("nobody")), metadata=metadata
    )
    return [message async for message in call]


async def export_orders(channel: grpc.aio.Channel, metadata: Metadata, _: int) -> object:
    stub = order_service_pb2_grpc.OrderServiceStub(channel)
    call = stub.ExportOrders(
        order_service_pb2.ExportOrdersRequest(customer_id=unique("nobody")), metadata=metadata
    )
    return [message async for message in call]


async def upload_events(channel: grpc.aio.Channel, metadata: Metadata, _: int) -> object:
    stub = event_service_pb2_grpc.EventServiceStub(channel)
    event = event_pb2.Event(type="com.example.auth", source="/auth", json_payload="{}")
    message = event_service_pb2.UploadEventsRequest(upload_id=unique("up"), events=[event] * 3)
    return await stub.UploadEvents(requests([message]), metadata=metadata)


async def import_orders(channel: grpc.aio.Channel, metadata: Metadata, _: int) -> object:
    stub = order_service_pb2_grpc.OrderServiceStub(channel)
    order = order_pb2.Order(
        customer_id=unique("imp"),
        currency="EUR",
        items=[order_pb2.LineItem(sku="SKU-1", quantity=1, unit_price_cents=100)],
    )
    message = order_service_pb2.ImportOrdersRequest(import_id=unique("imp"), orders=[order])
    return await stub.ImportOrders(requests([message]), metadata=metadata)


CALLS: dict[str, tuple[str, Call]] = {
    "GetOrder (unary)": ("read", get_order),
    "CreateOrder (unary)": ("write", create_order),
    "StreamEvents (server-streaming)": ("read", stream_events),
    "ExportOrders (server-streaming)": ("read", export_orders),
    "UploadEvents (client-streaming)": ("write", upload_events),
    "ImportOrders (client-streaming)": ("write", import_orders),
}


@pytest.fixture(scope="module")
async def order_id(orders) -> int:
    """An order to read, written through the session's service (auth off)."""
    return (await orders.CreateOrder(create_request())).id


async def refused(
    call: Call, channel: grpc.aio.Channel, metadata: Metadata, order_id: int = 0
) -> StatusDetails:
    try:
        await call(channel, metadata, order_id)
    except grpc.aio.AioRpcError as error:
        return details(error)
    raise AssertionError("the call succeeded")


# --------------------------------------------------------------------------
# The scope table
# --------------------------------------------------------------------------


def test_every_method_of_both_services_has_exactly_one_known_scope():
    served = {
        f"/{service.full_name}/{method.name}"
        for service in (ORDER_SERVICE, EVENT_SERVICE)
        for method in service.methods
    }
    assert set(METHOD_SCOPES) == served
    assert set(METHOD_SCOPES.values()) <= set(SCOPES)


def test_the_default_path_has_no_interceptor(service_env):
    """Auth off: no interceptor at all, not a pass-through one (its cost is
    paid by every call)."""
    settings = Settings.from_env(service_env)
    assert _interceptors(_watched_tokens(settings), Metrics()) is None


async def test_calls_need_no_token_when_auth_is_off(orders):
    order = await orders.CreateOrder(create_request())
    assert (await orders.GetOrder(order_service_pb2.GetOrderRequest(id=order.id))).id == order.id


# --------------------------------------------------------------------------
# Every kind of call, refused and admitted alike
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", CALLS)
async def test_a_call_without_a_token_is_unauthenticated(auth_channel, admin_db, order_id, name):
    _, call = CALLS[name]
    before = await table_counts(admin_db)
    error = await refused(call, auth_channel, (), order_id)
    assert error.code == grpc.StatusCode.UNAUTHENTICATED
    assert error.error_info is not None and error.error_info.reason == "TOKEN_MISSING"
    assert "authorization: Bearer <token>" in error.message
    if CALLS[name][0] == "write":
        assert await table_counts(admin_db) == before


@pytest.mark.parametrize("name", CALLS)
async def test_an_unknown_token_is_unauthenticated_and_not_echoed(
    auth_channel, admin_db, order_id, name
):
    _, call = CALLS[name]
    forged = secrets.token_urlsafe(32)
    before = await table_counts(admin_db)
    error = await refused(call, auth_channel, bearer(forged), order_id)
    assert error.code == grpc.StatusCode.UNAUTHENTICATED
    assert error.error_info is not None and error.error_info.reason == "TOKEN_UNKNOWN"
    assert error.message == "the token is not valid"
    assert forged not in str(error) and digest(forged) not in str(error)
    if CALLS[name][0] == "write":
        assert await table_counts(admin_db) == before


@pytest.mark.parametrize(
    "metadata",
    [
        (("authorization", "Basic dXNlcjpwYXNz"),),
        (("authorization", "Bearer"),),
        (("authorization", "Bearer two words"),),
        (("authorization", "Bearer a=b"),),
        (("authorization", "Bearer a"), ("authorization", "Bearer b")),
    ],
    ids=["basic", "no-token", "two-words", "not-b64token", "twice"],
)
async def test_malformed_authorization_is_unauthenticated(auth_channel, metadata):
    error = await refused(create_order, auth_channel, metadata)
    assert error.code == grpc.StatusCode.UNAUTHENTICATED
    assert error.error_info is not None and error.error_info.reason == "TOKEN_MALFORMED"
    assert "Bearer <token>" in error.message


@pytest.mark.parametrize("name", CALLS)
async def test_a_token_without_the_scope_is_permission_denied(
    auth_channel, admin_db, tokens, order_id, name
):
    scope, call = CALLS[name]
    other = tokens.writer if scope == "read" else tokens.reader
    before = await table_counts(admin_db)
    error = await refused(call, auth_channel, bearer(other), order_id)
    assert error.code == grpc.StatusCode.PERMISSION_DENIED
    assert error.error_info is not None and error.error_info.reason == "SCOPE_MISSING"
    assert dict(error.error_info.metadata)["scope"] == scope
    assert f"needs the '{scope}' scope" in error.message
    assert other not in str(error)
    if scope == "write":
        assert await table_counts(admin_db) == before


@pytest.mark.parametrize("name", CALLS)
async def test_a_token_with_the_scope_is_served(auth_channel, tokens, order_id, name):
    scope, call = CALLS[name]
    for token in (tokens.reader if scope == "read" else tokens.writer, tokens.both):
        assert await call(auth_channel, bearer(token), order_id) is not None


async def test_consumers_are_administered_with_the_admin_scope_alone(service_env, tmp_path, tokens):
    """A consumer acknowledges with `read`; listing, describing and resetting
    consumers needs `admin`, which neither `read` nor `write` grants."""
    admin = secrets.token_urlsafe(32)
    path = tmp_path / "tokens"
    path.write_text(tokens.file.read_text() + f"ops {digest(admin)} admin\n")
    async with app_with_channel(service_env, ORDERSTREAM_AUTH_TOKENS_FILE=str(path)) as (
        _,
        channel,
    ):
        stub = event_service_pb2_grpc.EventServiceStub(channel)
        listing = event_service_pb2.ListConsumersRequest()
        for token in tokens.all():
            error = await rpc_error(stub.ListConsumers(listing, metadata=bearer(token)))
            assert error.code == grpc.StatusCode.PERMISSION_DENIED
            assert error.error_info is not None
            assert dict(error.error_info.metadata)["scope"] == "admin"
        assert await stub.ListConsumers(listing, metadata=bearer(admin)) is not None
        ack = event_service_pb2.AckEventsRequest(consumer=unique("nobody"), position=1)
        error = await rpc_error(stub.AckEvents(ack, metadata=bearer(tokens.reader)))
        assert error.code == grpc.StatusCode.NOT_FOUND  # let through, then not found


async def test_the_scheme_is_case_insensitive(auth_channel, tokens):
    metadata = (("authorization", f"bearer {tokens.writer}"),)
    assert await create_order(auth_channel, metadata, 0) is not None


# --------------------------------------------------------------------------
# Health, reflection, and methods nobody listed
# --------------------------------------------------------------------------


async def test_health_needs_no_token(auth_channel):
    stub = health_pb2_grpc.HealthStub(auth_channel)
    for name in ("", "liveness"):
        response = await stub.Check(health_pb2.HealthCheckRequest(service=name))
        assert response.status == SERVING


async def list_services(channel: grpc.aio.Channel, metadata=()) -> set[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = stub.ServerReflectionInfo(metadata=metadata)
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    response = await call.read()
    await call.done_writing()
    return {service.name for service in response.list_services_response.service}


async def test_reflection_needs_a_valid_token_of_any_scope(auth_channel, tokens):
    with pytest.raises(grpc.aio.AioRpcError) as refused_call:
        await list_services(auth_channel)
    assert refused_call.value.code() == grpc.StatusCode.UNAUTHENTICATED
    for token in tokens.all():
        assert ORDER_SERVICE.full_name in await list_services(auth_channel, bearer(token))


async def test_a_method_missing_from_the_table_is_denied(tokens):
    """A method served next to the two services but not in METHOD_SCOPES
    (as a newly added RPC would be) is refused even to a token with every scope."""
    reached = []

    async def answer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        reached.append(request)
        return b""

    table = Tokens.load(tokens.file)
    server = grpc.aio.server(interceptors=[TokenAuth(lambda: table)])
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "orderstream.orders.v1.OrderService",
                {"PurgeOrders": grpc.unary_unary_rpc_method_handler(answer)},
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            purge = channel.unary_unary("/orderstream.orders.v1.OrderService/PurgeOrders")
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await purge(b"", metadata=bearer(tokens.both))
    finally:
        await server.stop(None)
    error = details(denied.value)
    assert error.code == grpc.StatusCode.PERMISSION_DENIED
    assert error.error_info is not None and error.error_info.reason == "METHOD_NOT_ALLOWED"
    assert reached == []


# --------------------------------------------------------------------------
# The tokens file
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("billing {digest} read,root\n", "line 1: scopes must be"),
        ("billing {digest}\n", "line 1: expected 'NAME SHA256_HEX SCOPES'"),
        ("# only a comment\n", "lists no token"),
        ("a {digest} read\nb {digest} write\n", "lists a token twice"),
        ("\nbilling {token} read\n", "line 2: the digest must be 64 lowercase hex digits"),
    ],
    ids=["unknown-scope", "no-scopes", "empty", "duplicate", "plain-token"],
)
async def test_a_bad_tokens_file_stops_startup_without_showing_its_content(
    service_env, tmp_path, content, expected
):
    token = secrets.token_urlsafe(32)
    path = tmp_path / "tokens"
    path.write_text(content.format(digest=digest(token), token=token))
    with pytest.raises(StartupError) as stopped:
        async with running_app(service_env, ORDERSTREAM_AUTH_TOKENS_FILE=str(path)):
            pass
    assert expected in str(stopped.value)
    assert token not in str(stopped.value) and digest(token) not in str(stopped.value)


async def test_a_missing_tokens_file_stops_startup(service_env, tmp_path):
    with pytest.raises(StartupError, match="cannot read ORDERSTREAM_AUTH_TOKENS_FILE"):
        async with running_app(service_env, ORDERSTREAM_AUTH_TOKENS_FILE=str(tmp_path / "absent")):
            pass


def test_lookup_compares_digests(tokens):
    table = Tokens.load(tokens.file)
    found = table.find(tokens.both)
    assert found is not None and found.name == "billing"
    assert found.scopes == frozenset({"read", "write"})
    assert table.find(tokens.both + "x") is None
    assert table.find(digest(tokens.both)) is None  # the file's digest is no token
    assert auth.OPEN_SERVICES == ("grpc.health.v1.Health",)


# --------------------------------------------------------------------------
# The Python client's token option
# --------------------------------------------------------------------------


async def test_the_python_client_sends_its_token_over_tls(service_env, tokens, tmp_path, order_id):
    certs = make_certificates(tmp_path, hosts=("127.0.0.1",))
    async with (
        running_app(
            service_env,
            ORDERSTREAM_AUTH_TOKENS_FILE=str(tokens.file),
            ORDERSTREAM_TLS_CERT=str(certs.server_cert),
            ORDERSTREAM_TLS_KEY=str(certs.server_key),
        ) as app,
        create_channel(f"127.0.0.1:{app.port}", ca_file=certs.ca_cert, token=tokens.reader) as ch,
    ):
        stub = order_service_pb2_grpc.OrderServiceStub(ch)
        read = await stub.GetOrder(order_service_pb2.GetOrderRequest(id=order_id))
        assert read.id == order_id
        error = await refused(create_order, ch, ())
        assert error.code == grpc.StatusCode.PERMISSION_DENIED


def test_the_python_client_refuses_a_token_in_plain_text():
    with pytest.raises(ValueError, match="over TLS only"):
        create_channel("127.0.0.1:1", insecure=True, token="secret")


def documented_token_line() -> str:
    """The buf curl line with a token in docs/security.md."""
    (line,) = [
        line
        for line in (REPO / "docs" / "security.md").read_text().splitlines()
        if line.startswith("TOKEN=... ; npx buf curl")
    ]
    return line


@pytest.mark.slow
async def test_the_documented_buf_curl_line_with_a_token_works(
    service_env, tokens, tmp_path, order_id
):
    certs = make_certificates(tmp_path, hosts=("127.0.0.1",))
    async with running_app(
        service_env,
        ORDERSTREAM_AUTH_TOKENS_FILE=str(tokens.file),
        ORDERSTREAM_TLS_CERT=str(certs.server_cert),
        ORDERSTREAM_TLS_KEY=str(certs.server_key),
    ) as app:
        command = (
            documented_token_line()
            .replace("TOKEN=...", f"TOKEN={tokens.reader}")
            .replace("--cacert ca.crt", f"--cacert {certs.ca_cert}")
            .replace("https://orderstream:50051", f"https://127.0.0.1:{app.port}")
            .replace('{"id": 1}', f'{{"id": {order_id}}}')
        )
        code, out, err = await run_shell(command)
    assert code == 0, err
    assert json.loads(out)["id"] == str(order_id)
