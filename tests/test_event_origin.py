"""The change feed cannot be forged: the service's own event types
(`order.*`) and source are refused to every caller of PublishEvents and
UploadEvents, and a token or a certificate identity may be limited to some
types and sources
(service/events/origin.py, service/rpc/write_limits.py). Everything over
real gRPC; a refused call writes nothing."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest

from devcluster.cluster import make_certificates
from orderstream.events.v1 import event_pb2, event_service_pb2, event_service_pb2_grpc
from orderstream.orders.v1 import order_pb2, order_service_pb2, order_service_pb2_grpc
from service.errors import StartupError
from service.rpc.auth import SCOPES, Tokens
from service.rpc.cert_identities import CertificateIdentities
from tests.support.apps import app_with_channel, closed, running_app
from tests.support.client_identity import ClientIdentity, client_identity
from tests.support.database import table_counts
from tests.support.loaders import FORGED_EVENTS, UPLOAD, event
from tests.support.requests import create_request, stream, unique
from tests.support.status import StatusDetails, rpc_error
from tests.support.tokens import bearer, digest

DENIED = grpc.StatusCode.PERMISSION_DENIED

forged = pytest.mark.parametrize(
    ("fields", "field", "reason"), FORGED_EVENTS, ids=lambda case: repr(case)[:30]
)
# Close to the reserved ones, and not reserved.
NEAR_MISSES = [
    {"type": "orders.created"},
    {"type": "Order.created"},
    {"type": "order"},
    {"type": "com.example.order.created"},
    {"source": "/orderstream"},
    {"source": "orderstream2"},
    {"source": "Orderstream"},
]


def assert_denied(error: StatusDetails, reason: str, field: str, value: str) -> None:
    assert error.code == DENIED, error.message
    assert error.error_info is not None and error.error_info.reason == reason
    assert error.error_info.metadata["field"] == field
    assert error.error_info.metadata["value"] == value
    assert field in error.message


def publish(*events: event_pb2.Event) -> event_service_pb2.PublishEventsRequest:
    return event_service_pb2.PublishEventsRequest(events=events)


# --------------------------------------------------------------------------
# Reserved for the service, whoever calls
# --------------------------------------------------------------------------


@forged
async def test_publishing_a_forged_event_is_denied_and_writes_nothing(
    events, admin_db, fields, field, reason
):
    before = await table_counts(admin_db)
    error = await rpc_error(events.PublishEvents(publish(event(), event(**fields), event())))
    assert_denied(error, reason, f"events[1].{field}", str(fields[field]))
    assert await table_counts(admin_db) == before


@forged
async def test_an_upload_carrying_a_forged_event_rolls_back_whole(
    channel, admin_db, fields, field, reason
):
    upload_id = unique("upload")
    batches = [[event()] * 1000 for _ in range(3)]
    batches[2][500] = event(**fields)
    before = await table_counts(admin_db)
    error = await rpc_error(UPLOAD.load(channel, UPLOAD.messages(upload_id, batches)))
    assert_denied(error, reason, f"messages[2].events[500].{field}", str(fields[field]))
    assert await table_counts(admin_db) == before
    assert await UPLOAD.stored(admin_db, upload_id) is None


@pytest.mark.parametrize("fields", NEAR_MISSES, ids=str)
async def test_near_misses_are_written(events, channel, fields):
    published = await events.PublishEvents(publish(event(**fields)))
    assert len(published.ids) == 1
    uploaded = await UPLOAD.load(channel, UPLOAD.messages(unique("upload"), [[event(**fields)]]))
    assert uploaded.event_count == 1


async def test_what_the_service_writes_for_orders_is_what_is_reserved(orders, events, admin_db):
    """Copies of the service's own order events, type and source as it wrote
    them, are refused."""
    created = await orders.CreateOrder(create_request())
    await orders.UpdateOrderStatus(
        order_service_pb2.UpdateOrderStatusRequest(
            id=created.id, status=order_pb2.ORDER_STATUS_PAID
        )
    )
    own = await admin_db.fetch(
        "SELECT type, source FROM events WHERE subject = $1", f"orders/{created.id}"
    )
    assert {row["type"] for row in own} == {"order.created", "order.status_changed"}
    for row in own:
        for copy in (
            event(type=row["type"]),
            event(source=row["source"]),
            event(type=row["type"], source=row["source"]),
        ):
            error = await rpc_error(events.PublishEvents(publish(copy)))
            assert error.code == DENIED
            assert error.error_info is not None
            assert error.error_info.reason.startswith("RESERVED_EVENT_")


# --------------------------------------------------------------------------
# Limits granted with a token
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Callers:
    billing: str  # types=billing.*,invoice.paid sources=/billing,/billing/*
    typed: str  # types=audit.* only
    unlimited: str  # write, no limits
    channel: grpc.aio.Channel


@pytest.fixture(scope="module")
async def callers(service_env, tmp_path_factory) -> AsyncIterator[Callers]:
    billing, typed, unlimited = (secrets.token_urlsafe(32) for _ in range(3))
    path = tmp_path_factory.mktemp("limits") / "tokens"
    path.write_text(
        f"billing   {digest(billing)} read,write types=billing.*,invoice.paid "
        "sources=/billing,/billing/*\n"
        f"auditor   {digest(typed)} write   types=audit.*   # any source\n"
        f"ingest    {digest(unlimited)} read,write\n"
    )
    async with app_with_channel(service_env, ORDERSTREAM_AUTH_TOKENS_FILE=str(path)) as (
        _,
        channel,
    ):
        yield Callers(billing, typed, unlimited, channel)


def stub(callers: Callers) -> event_service_pb2_grpc.EventServiceStub:
    return event_service_pb2_grpc.EventServiceStub(callers.channel)


@pytest.mark.parametrize(
    "fields",
    [
        {"type": "billing.charged", "source": "/billing"},
        {"type": "billing.refund.partial", "source": "/billing/eu"},
        {"type": "invoice.paid", "source": "/billing/"},
    ],
    ids=str,
)
async def test_a_limited_token_writes_what_its_limits_match(callers, fields):
    published = await stub(callers).PublishEvents(
        publish(event(**fields)), metadata=bearer(callers.billing)
    )
    assert len(published.ids) == 1
    uploaded = await stub(callers).UploadEvents(
        stream(UPLOAD.messages(unique("upload"), [[event(**fields)]] * 2)),
        metadata=bearer(callers.billing),
    )
    assert uploaded.event_count == 2


@pytest.mark.parametrize(
    ("fields", "field", "reason"),
    [
        ({"type": "shipping.sent", "source": "/billing"}, "type", "EVENT_TYPE_NOT_GRANTED"),
        ({"type": "invoice.paid.late", "source": "/billing"}, "type", "EVENT_TYPE_NOT_GRANTED"),
        ({"type": "billing", "source": "/billing"}, "type", "EVENT_TYPE_NOT_GRANTED"),
        ({"type": "billing.charged", "source": "/warehouse"}, "source", "EVENT_SOURCE_NOT_GRANTED"),
        ({"type": "billing.charged", "source": "/billingx"}, "source", "EVENT_SOURCE_NOT_GRANTED"),
        ({"type": "order.created", "source": "/billing"}, "type", "RESERVED_EVENT_TYPE"),
    ],
    ids=str,
)
async def test_a_limited_token_is_denied_the_rest_and_writes_nothing(
    callers, admin_db, fields, field, reason
):
    before = await table_counts(admin_db)
    error = await rpc_error(
        stub(callers).PublishEvents(
            publish(event(type="billing.ok", source="/billing"), event(**fields)),
            metadata=bearer(callers.billing),
        )
    )
    assert_denied(error, reason, f"events[1].{field}", str(fields[field]))
    if reason != "RESERVED_EVENT_TYPE":
        assert error.error_info is not None and error.error_info.metadata["caller"] == "billing"
    upload_id = unique("upload")
    batches = [[event(type="billing.ok", source="/billing")] * 200 for _ in range(3)]
    batches[1][150] = event(**fields)
    error = await rpc_error(
        stub(callers).UploadEvents(
            stream(UPLOAD.messages(upload_id, batches)), metadata=bearer(callers.billing)
        )
    )
    assert_denied(error, reason, f"messages[1].events[150].{field}", str(fields[field]))
    assert await table_counts(admin_db) == before
    assert await UPLOAD.stored(admin_db, upload_id) is None


async def test_a_types_limit_alone_leaves_sources_open(callers):
    written = await stub(callers).PublishEvents(
        publish(event(type="audit.read", source="/anywhere")), metadata=bearer(callers.typed)
    )
    assert len(written.ids) == 1
    error = await rpc_error(
        stub(callers).PublishEvents(
            publish(event(type="billing.charged", source="/billing")),
            metadata=bearer(callers.typed),
        )
    )
    assert error.error_info is not None and error.error_info.reason == "EVENT_TYPE_NOT_GRANTED"
    assert error.error_info.metadata["caller"] == "auditor"


async def test_each_call_has_its_own_callers_limits(callers):
    """Limited and unlimited calls interleaved on one connection: each is
    judged by its own token's limits only."""
    request = publish(event(type="shipping.sent", source="/warehouse"))

    async def call(token: str) -> grpc.StatusCode:
        try:
            await stub(callers).PublishEvents(request, metadata=bearer(token))
        except grpc.aio.AioRpcError as error:
            return error.code()
        return grpc.StatusCode.OK

    tokens = [callers.billing, callers.unlimited] * 20
    outcomes = await asyncio.gather(*(call(token) for token in tokens))
    assert outcomes == [DENIED, grpc.StatusCode.OK] * 20


async def test_the_unlimited_token_is_still_refused_reserved_events(callers, admin_db):
    before = await table_counts(admin_db)
    error = await rpc_error(
        stub(callers).PublishEvents(
            publish(event(source="orderstream")), metadata=bearer(callers.unlimited)
        )
    )
    assert error.error_info is not None and error.error_info.reason == "RESERVED_EVENT_SOURCE"
    assert await table_counts(admin_db) == before


async def test_a_limited_token_still_creates_orders(callers):
    """The limits bind the events a caller writes, not the service's own."""
    orders = order_service_pb2_grpc.OrderServiceStub(callers.channel)
    created = await orders.CreateOrder(create_request(), metadata=bearer(callers.billing))
    assert created.id > 0


# --------------------------------------------------------------------------
# The tokens file's limit fields
# --------------------------------------------------------------------------


def load(tmp_path, line: str) -> Tokens:
    path = tmp_path / "tokens"
    path.write_text(f"# a comment\n{line}\n")
    return Tokens.load(path)


def test_a_line_without_limits_has_none(tmp_path):
    token = secrets.token_urlsafe(32)
    caller = load(tmp_path, f"ingest {digest(token)} write").find(token)
    assert caller is not None and caller.limits is None


def test_limits_are_read_from_the_line(tmp_path):
    token = secrets.token_urlsafe(32)
    line = f"billing {digest(token)} write sources=/billing,/b/* types=*"
    caller = load(tmp_path, line).find(token)
    assert caller is not None and caller.limits is not None
    types, sources = caller.limits.types, caller.limits.sources
    assert types is not None and types.allows("anything")
    assert sources is not None and sources.allows("/billing") and sources.allows("/b/x")
    assert not sources.allows("/billing/x") and not sources.allows("/b")


@pytest.mark.parametrize(
    ("limits", "expected"),
    [
        ("colors=red", "only types=PATTERN"),
        ("types", "only types=PATTERN"),
        ("types=a.* types=b.*", "types= is given twice"),
        ("types=", "comma-separated list"),
        ("types=a,,b", "comma-separated list"),
        ("sources=/a*b", "`*` only at its end"),
        ("types=" + "t" * 1025, "comma-separated list"),
    ],
    ids=str,
)
def test_a_bad_limit_stops_startup_naming_the_line(tmp_path, limits, expected):
    token = secrets.token_urlsafe(32)
    with pytest.raises(StartupError) as stopped:
        load(tmp_path, f"billing {digest(token)} write {limits}")
    assert "line 2: " in str(stopped.value) and expected in str(stopped.value)
    assert digest(token) not in str(stopped.value)


# --------------------------------------------------------------------------
# Limits granted with a certificate identity, over mTLS
# --------------------------------------------------------------------------

LIMITED_URI = "spiffe://prod/ns/billing/sa/billing"


@dataclass(frozen=True)
class CertificateCallers:
    limited: grpc.aio.Channel  # types=billing.* sources=/billing
    unlimited: grpc.aio.Channel  # write, no limits


@pytest.fixture(scope="module")
async def certificate_callers(service_env, tmp_path_factory) -> AsyncIterator[CertificateCallers]:
    directory = tmp_path_factory.mktemp("cert-limits")
    server = make_certificates(tmp_path_factory.mktemp("cert-limits-tls"), hosts=("127.0.0.1",))
    limited = client_identity("billing-writer", uris=(LIMITED_URI,))
    unlimited = client_identity("ingest-writer")
    client_ca = directory / "client-ca.crt"
    client_ca.write_bytes(limited.ca_cert + unlimited.ca_cert)
    identities = directory / "identities"
    identities.write_text(
        "# name   scopes  limits                              identity\n"
        f"billing  write   types=billing.*   sources=/billing  uri:{LIMITED_URI}\n"
        "ingest   write   subject:CN=ingest-writer\n"
    )
    env = {
        **closed(service_env),
        "ORDERSTREAM_TLS_CERT": str(server.server_cert),
        "ORDERSTREAM_TLS_KEY": str(server.server_key),
        "ORDERSTREAM_TLS_CLIENT_CA": str(client_ca),
        "ORDERSTREAM_AUTH_CERT_IDENTITIES_FILE": str(identities),
    }

    def channel_as(identity: ClientIdentity, port: int) -> grpc.aio.Channel:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=server.ca_cert.read_bytes(),
            private_key=identity.key,
            certificate_chain=identity.cert,
        )
        return grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials)

    async with (
        running_app(env) as app,
        channel_as(limited, app.port) as limited_channel,
        channel_as(unlimited, app.port) as unlimited_channel,
    ):
        yield CertificateCallers(limited_channel, unlimited_channel)


async def test_a_certificate_identity_writes_within_its_limits(certificate_callers):
    events = event_service_pb2_grpc.EventServiceStub(certificate_callers.limited)
    published = await events.PublishEvents(publish(event(type="billing.paid", source="/billing")))
    assert len(published.ids) == 1
    uploaded = await events.UploadEvents(
        stream(
            UPLOAD.messages(unique("upload"), [[event(type="billing.paid", source="/billing")]] * 2)
        )
    )
    assert uploaded.event_count == 2


async def test_a_certificate_identity_is_denied_beyond_its_limits(certificate_callers, admin_db):
    limited = event_service_pb2_grpc.EventServiceStub(certificate_callers.limited)
    before = await table_counts(admin_db)
    error = await rpc_error(
        limited.PublishEvents(publish(event(type="shipping.sent", source="/billing")))
    )
    assert_denied(error, "EVENT_TYPE_NOT_GRANTED", "events[0].type", "shipping.sent")
    assert error.error_info is not None and error.error_info.metadata["caller"] == "billing"
    batches = [[event(type="billing.paid", source="/billing")] * 100 for _ in range(2)]
    batches[1][60] = event(type="billing.paid", source="/warehouse")
    error = await rpc_error(
        limited.UploadEvents(stream(UPLOAD.messages(unique("upload"), batches)))
    )
    assert_denied(error, "EVENT_SOURCE_NOT_GRANTED", "messages[1].events[60].source", "/warehouse")
    assert await table_counts(admin_db) == before
    # The identity without limits writes what the limited one may not,
    # but not the service's own events either.
    unlimited = event_service_pb2_grpc.EventServiceStub(certificate_callers.unlimited)
    written = await unlimited.PublishEvents(publish(event(type="shipping.sent", source="/w")))
    assert len(written.ids) == 1
    error = await rpc_error(unlimited.PublishEvents(publish(event(type="order.created"))))
    assert_denied(error, "RESERVED_EVENT_TYPE", "events[0].type", "order.created")


def test_an_identities_line_reads_its_limits_before_the_identity(tmp_path):
    path = tmp_path / "identities"
    data = (
        b"billing write types=billing.*,invoice.paid\tsources=/b  subject:CN=a b,O=Example Corp\n"
        b"plain   read  uri:spiffe://x\n"
    )
    table = CertificateIdentities.parse(data, path, SCOPES)
    billing = table.find({"x509_subject": [b"CN=a b,O=Example Corp"]})
    assert billing is not None and billing.limits is not None
    assert billing.limits.types is not None and billing.limits.types.allows("invoice.paid")
    assert billing.limits.sources is not None and not billing.limits.sources.allows("/c")
    plain = table.find({"peer_uri": [b"spiffe://x"]})
    assert plain is not None and plain.limits is None


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("billing write types=a*b uri:spiffe://x", "`*` only at its end"),
        ("billing write types=a.* types=b.* uri:spiffe://x", "types= is given twice"),
        ("billing write types=a.*", "the identity must be one of"),
    ],
    ids=str,
)
def test_a_bad_limit_in_the_identities_file_stops_startup(tmp_path, line, expected):
    with pytest.raises(StartupError, match="line 1: ") as stopped:
        CertificateIdentities.parse(f"{line}\n".encode(), tmp_path / "identities", SCOPES)
    assert expected in str(stopped.value)
