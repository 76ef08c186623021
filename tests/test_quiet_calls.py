"""Quiet callers cannot hold resources for ever (docs/streams.md#quiet-callers):
server streams whose reader stopped taking messages end READER_STALLED
with the position to resume from; client streams whose caller sends no
first message, or goes quiet after some, end CLIENT_STREAM_IDLE with
nothing loaded; either way slots, connections and transactions come back.
Behind them: server keepalive for peers gone without a word, and
PostgreSQL's idle_in_transaction_session_timeout as the backstop.

Every timeout here is set small (0.5 s) through the settings and its
outcome awaited; each test fails on a server without these bounds, where
the calls never end (the asyncio.timeout guards only turn that hang into a
failure)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable

import grpc
import pytest

from orderstream.client import keepalive_options
from orderstream.events.v1 import event_service_pb2, event_service_pb2_grpc
from orderstream.orders.v1 import order_service_pb2, order_service_pb2_grpc
from service.app import App, _server_options
from service.settings import Settings, SettingsError
from tests.support.apps import pool_is_full, running_app
from tests.support.calls import export_all
from tests.support.database import nothing_left_running, table_counts
from tests.support.loaders import LOADERS, Loader
from tests.support.polling import eventually
from tests.support.requests import create_request, unique
from tests.support.status import StatusDetails, details, rpc_error

STALL = 0.5  # every quiet-caller timeout of the module's app, in seconds
STREAMS = 5  # its stream slots, all of which the quiet calls take
# Far more than gRPC and the sockets buffer for a reader that stopped (a
# few MiB): the server must be left waiting in a write.
STALLED_EVENTS = 20_000
PAD = "x" * 1000
# Bounds the wait for an outcome that must come within STALL, so that a
# server without the timeouts fails the test instead of hanging it.
OUTCOME_WITHIN = 30

loaders = pytest.mark.parametrize("loader", LOADERS, ids=lambda loader: loader.rpc)


@pytest.fixture(scope="module")
async def quiet_app(service_env) -> AsyncIterator[App]:
    async with running_app(
        service_env,
        ORDERSTREAM_MAX_STREAMS=str(STREAMS),
        ORDERSTREAM_WRITE_STALL_TIMEOUT=str(STALL),
        ORDERSTREAM_FIRST_MESSAGE_TIMEOUT=str(STALL),
        ORDERSTREAM_CLIENT_IDLE_TIMEOUT=str(STALL),
    ) as app:
        yield app


@pytest.fixture(scope="module")
async def quiet_channel(quiet_app) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{quiet_app.port}") as channel:
        yield channel


async def resources_back(app: App, admin_db) -> None:
    """Every stream slot is free, every connection is back in the pool and
    no backend of the service is left idle in a transaction (or copying)."""
    await eventually(lambda: slots_free(app), what="the stream slots to free")
    await eventually(lambda: pool_is_full(app), what="the connections to return")
    await eventually(lambda: nothing_left_running(admin_db), what="the transactions to end")


async def slots_free(app: App) -> bool:
    return app.streams.in_use == 0


async def an_export_is_served(channel: grpc.aio.Channel) -> None:
    """An export needs a stream slot: the quiet calls gave theirs back."""
    stub = order_service_pb2_grpc.OrderServiceStub(channel)
    customer = unique("after-quiet")
    created = await stub.CreateOrder(create_request(customer_id=customer), timeout=10)
    exported, _ = await export_all(
        stub, order_service_pb2.ExportOrdersRequest(customer_id=customer)
    )
    assert [order.id for order in exported] == [created.id]


async def read_on(call, items: str) -> tuple[StatusDetails, int]:
    """A stalled reader reading again: it receives every message written
    (the stalled one too), then the status; returns the status and the last
    id received."""
    last = 0
    try:
        async with asyncio.timeout(OUTCOME_WITHIN):
            while (response := await call.read()) is not grpc.aio.EOF:
                last = getattr(response, items)[-1].id
    except grpc.aio.AioRpcError as error:
        return details(error), last
    raise AssertionError("the stream ended without an error")


def assert_stalled(error: StatusDetails) -> int:
    """UNAVAILABLE, READER_STALLED, RetryInfo; returns the position."""
    assert error.code == grpc.StatusCode.UNAVAILABLE, error.message
    assert error.error_info is not None and error.error_info.reason == "READER_STALLED"
    assert error.retry_info is not None
    assert "ORDERSTREAM_WRITE_STALL_TIMEOUT" in error.message
    return int(error.error_info.metadata["position"])


# --------------------------------------------------------------------------
# Server streams: the reader stops
# --------------------------------------------------------------------------


async def test_history_streams_whose_readers_stop_end_reader_stalled(
    quiet_app, quiet_channel, admin_db
):
    """Five history streams without a deadline read one message each and
    stop. Within the stall timeout the server ends them, their slots,
    connections and snapshots come back while the readers still read
    nothing, and an export is served. Readers that read again get what was
    written, then READER_STALLED naming the last id they received: the id
    the Python client's stream_events resumes after on UNAVAILABLE."""
    subject = unique("stalled/")
    last_id = await admin_db.fetchval(
        "WITH written AS ("
        " INSERT INTO events (type, source, subject, time, payload)"
        " SELECT 'test.stalled', '/tests', $1, now(), jsonb_build_object('n', n, 'pad', $2::text)"
        " FROM generate_series(1, $3) AS n RETURNING id)"
        " SELECT max(id) FROM written",
        subject,
        PAD,
        STALLED_EVENTS,
    )
    stub = event_service_pb2_grpc.EventServiceStub(quiet_channel)
    calls = [
        stub.StreamEvents(event_service_pb2.StreamEventsRequest(subject=subject))
        for _ in range(STREAMS)
    ]
    for call in calls:
        await call.read()
    await resources_back(quiet_app, admin_db)
    await an_export_is_served(quiet_channel)
    for error, received in await asyncio.gather(*(read_on(call, "events") for call in calls)):
        assert assert_stalled(error) == received
        assert received < last_id  # the history was cut short


async def test_an_export_whose_reader_stops_ends_reader_stalled(quiet_app, quiet_channel, admin_db):
    customer = unique("stalled-export")
    await admin_db.execute(
        """
        WITH created AS (
            INSERT INTO orders (customer_id, currency, total_cents)
            SELECT $1, 'EUR', 4 FROM generate_series(1, $3) RETURNING id
        )
        INSERT INTO order_items (order_id, line_no, sku, quantity, unit_price_cents)
        SELECT id, line, $2, 1, 1 FROM created, generate_series(1, 4) AS line
        """,
        customer,
        PAD,
        STALLED_EVENTS // 4,
    )
    stub = order_service_pb2_grpc.OrderServiceStub(quiet_channel)
    call = stub.ExportOrders(order_service_pb2.ExportOrdersRequest(customer_id=customer))
    await call.read()
    await resources_back(quiet_app, admin_db)
    await an_export_is_served(quiet_channel)
    error, received = await read_on(call, "orders")
    assert assert_stalled(error) == received
    last_order = await admin_db.fetchval(
        "SELECT max(id) FROM orders WHERE customer_id = $1", customer
    )
    assert received < last_order


# --------------------------------------------------------------------------
# Client streams: the caller goes quiet
# --------------------------------------------------------------------------


async def then_quiet(messages: Iterable[object], release: asyncio.Event) -> AsyncIterator[object]:
    """Sends `messages`, then nothing (and does not end the stream) until
    `release` is set."""
    for message in messages:
        yield message
    await release.wait()


def assert_idle(error: StatusDetails, index: int) -> None:
    assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED, error.message
    assert error.error_info is not None and error.error_info.reason == "CLIENT_STREAM_IDLE"
    assert error.error_info.metadata["message_index"] == str(index)


@loaders
async def test_loads_that_never_send_a_first_message_give_their_slots_back(
    quiet_app, quiet_channel, admin_db, loader: Loader
):
    release = asyncio.Event()
    try:
        async with asyncio.timeout(OUTCOME_WITHIN):
            errors = await asyncio.gather(
                *(
                    rpc_error(loader.method(quiet_channel)(then_quiet([], release)))
                    for _ in range(STREAMS)
                )
            )
    finally:
        release.set()
    for error in errors:
        assert_idle(error, 0)
        assert "ORDERSTREAM_FIRST_MESSAGE_TIMEOUT" in error.message
    # A sixth load finds a slot.
    key = unique(loader.key_name)
    response = await loader.load(quiet_channel, loader.messages(key, [[loader.item()]]))
    assert loader.count(response) == 1
    await an_export_is_served(quiet_channel)


@loaders
async def test_a_load_that_goes_quiet_rolls_back(quiet_app, quiet_channel, admin_db, loader):
    key = unique(loader.key_name)
    tag = unique("quiet")
    before = await table_counts(admin_db)
    release = asyncio.Event()
    try:
        async with asyncio.timeout(OUTCOME_WITHIN):
            error = await rpc_error(
                loader.method(quiet_channel)(
                    then_quiet(loader.messages(key, [[loader.tagged(tag)] * 50]), release)
                )
            )
    finally:
        release.set()
    assert_idle(error, 1)
    assert "ORDERSTREAM_CLIENT_IDLE_TIMEOUT" in error.message
    await resources_back(quiet_app, admin_db)
    assert await loader.tagged_rows(admin_db, tag) == 0
    assert await loader.stored(admin_db, key) is None
    assert await table_counts(admin_db) == before


@loaders
async def test_a_retry_of_a_committed_load_that_goes_quiet_gives_its_slot_back(
    quiet_app, quiet_channel, admin_db, loader
):
    """A retry reads its stream to the end before the stored answer, under
    the same idle timeout as a load."""
    key = unique(loader.key_name)
    first = await loader.load(quiet_channel, loader.messages(key, [[loader.item()] * 3]))
    before = await table_counts(admin_db)
    release = asyncio.Event()
    try:
        async with asyncio.timeout(OUTCOME_WITHIN):
            error = await rpc_error(
                loader.method(quiet_channel)(
                    then_quiet(loader.messages(key, [[loader.item()] * 3] * 2), release)
                )
            )
    finally:
        release.set()
    assert_idle(error, 2)
    await resources_back(quiet_app, admin_db)
    assert await table_counts(admin_db) == before
    assert await loader.load(quiet_channel, loader.messages(key, [[loader.item()]])) == first


# --------------------------------------------------------------------------
# The backstops, and the settings
# --------------------------------------------------------------------------


async def test_pooled_sessions_carry_the_idle_in_transaction_backstop(service_env):
    async with (
        running_app(
            service_env,
            ORDERSTREAM_WRITE_STALL_TIMEOUT="12",
            ORDERSTREAM_IDLE_IN_TRANSACTION_TIMEOUT="45",
        ) as app,
        app.pool.acquire() as conn,
    ):
        setting = await conn.fetchval(
            "SELECT setting FROM pg_settings WHERE name = 'idle_in_transaction_session_timeout'"
        )
    assert setting == "45000"  # milliseconds


async def test_the_backstop_ends_a_transaction_left_idle(service_env, admin_db):
    """What it is there for: a pooled session idle in a transaction (here
    one the test leaves open) is ended by PostgreSQL itself."""
    async with running_app(
        service_env,
        ORDERSTREAM_WRITE_STALL_TIMEOUT="0.5",
        ORDERSTREAM_IDLE_IN_TRANSACTION_TIMEOUT="1",
    ) as app:
        conn = await app.pool.acquire()
        pid = await conn.fetchval("SELECT pg_backend_pid()")
        try:
            await conn.execute("BEGIN")

            async def ended() -> bool:
                return not await admin_db.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid
                )

            await eventually(ended, what="PostgreSQL to end the session")
        finally:
            # asyncpg hands a lost connection back itself; this is a no-op then.
            await app.pool.release(conn)


def test_the_server_pings_and_accepts_the_clients_pings(service_env):
    options = dict(_server_options(Settings.from_env(service_env), reuse_port=False))
    assert options["grpc.keepalive_time_ms"] == 60_000
    assert options["grpc.keepalive_timeout_ms"] == 20_000
    # Pings go on over quiet follow streams, on connections with calls only.
    assert options["grpc.http2.max_pings_without_data"] == 0
    assert options["grpc.keepalive_permit_without_calls"] == 0
    # The Python client's pings are never "too many".
    client = dict(keepalive_options())
    assert (
        client["grpc.keepalive_time_ms"] > options["grpc.http2.min_ping_interval_without_data_ms"]
    )
    assert client["grpc.keepalive_permit_without_calls"] == 0
    tuned = Settings.from_env(
        {**service_env, "ORDERSTREAM_KEEPALIVE_TIME": "30", "ORDERSTREAM_KEEPALIVE_TIMEOUT": "5"}
    )
    options = dict(_server_options(tuned, reuse_port=False))
    assert (options["grpc.keepalive_time_ms"], options["grpc.keepalive_timeout_ms"]) == (
        30_000,
        5_000,
    )


def test_quiet_call_defaults(service_env):
    settings = Settings.from_env(service_env)
    assert settings.first_message_timeout == 10
    assert settings.client_idle_timeout == 30
    assert settings.write_stall_timeout == 30
    assert settings.keepalive_time == 60
    assert settings.keepalive_timeout == 20
    assert settings.idle_in_transaction_timeout == 60


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("ORDERSTREAM_FIRST_MESSAGE_TIMEOUT", "0"),
        ("ORDERSTREAM_CLIENT_IDLE_TIMEOUT", "-1"),
        ("ORDERSTREAM_WRITE_STALL_TIMEOUT", "86400"),
        ("ORDERSTREAM_KEEPALIVE_TIME", "5"),
        ("ORDERSTREAM_KEEPALIVE_TIMEOUT", "0.5"),
        ("ORDERSTREAM_IDLE_IN_TRANSACTION_TIMEOUT", "0.5"),
        ("ORDERSTREAM_IDLE_IN_TRANSACTION_TIMEOUT", "soon"),
    ],
)
def test_bad_quiet_call_settings_name_the_variable(service_env, name, value):
    with pytest.raises(SettingsError, match=name):
        Settings.from_env({**service_env, name: value})


@pytest.mark.parametrize(("backstop", "stall"), [("30", "30"), ("60", "90")])
def test_the_backstop_must_exceed_the_write_stall_timeout(service_env, backstop, stall):
    with pytest.raises(SettingsError) as raised:
        Settings.from_env(
            {
                **service_env,
                "ORDERSTREAM_IDLE_IN_TRANSACTION_TIMEOUT": backstop,
                "ORDERSTREAM_WRITE_STALL_TIMEOUT": stall,
            }
        )
    message = str(raised.value)
    assert "ORDERSTREAM_IDLE_IN_TRANSACTION_TIMEOUT" in message
    assert "ORDERSTREAM_WRITE_STALL_TIMEOUT" in message


async def test_behind_pgbouncer_the_backstop_is_not_sent_and_its_absence_is_logged(
    service_env, pgbouncer, caplog
):
    """PgBouncer refuses the startup parameter ("unsupported startup
    parameter"), so pooled connections through it do not send it: the
    service starts, reads what its pooled sessions really have (the test
    role sets nothing) and warns that the role must carry it."""
    with caplog.at_level("WARNING", logger="service.db.pool"):
        async with running_app(service_env, **pgbouncer.service_env()) as app:
            setting = await app.pool.fetchval(
                "SELECT setting FROM pg_settings WHERE name = 'idle_in_transaction_session_timeout'"
            )
    assert setting == "0"
    warned = [r.getMessage() for r in caplog.records if r.name == "service.db.pool"]
    assert any("ALTER ROLE" in message for message in warned), warned
