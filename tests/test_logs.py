"""Access logs and tracing, read from a real `python -m service` process: one
JSON line per RPC with the caller's request id (or a made-up one), method,
code and duration, and never a secret; OpenTelemetry spans for RPCs and
their queries only when the OTEL_* variables ask for them."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import grpc
import pytest

from devcluster.process import ServiceProcess, process_env, service_process
from orderstream.orders.v1 import order_service_pb2, order_service_pb2_grpc
from service.ops import logs
from tests.support.polling import eventually
from tests.support.requests import create_request
from tests.support.status import rpc_error

GET_ORDER = "/orderstream.orders.v1.OrderService/GetOrder"
CREATE_ORDER = "/orderstream.orders.v1.OrderService/CreateOrder"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
# Printable, so logged; with what JSON must escape.
CALLERS_REQUEST_ID = 'req "from" \\caller\\ 1'  # metadata is ASCII


def rpc_lines(records: list[dict]) -> list[dict]:
    return [entry for entry in records if entry.get("message") == "rpc"]


async def test_one_json_line_per_rpc_with_request_id_and_no_secrets(service_env, migrated):
    env = process_env(service_env, ORDERSTREAM_MIGRATE_ON_START="false")
    password = urlsplit(env["DATABASE_URL"]).password
    assert password
    async with service_process(env, "serve") as child:
        port = (await child.record("serving"))["port"]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            orders = order_service_pb2_grpc.OrderServiceStub(channel)
            order = await orders.CreateOrder(
                create_request(), metadata=(("x-request-id", CALLERS_REQUEST_ID),)
            )
            missing = await rpc_error(
                orders.GetOrder(order_service_pb2.GetOrderRequest(id=order.id + 10**9))
            )
            assert missing.code == grpc.StatusCode.NOT_FOUND
        child.process.send_signal(signal.SIGTERM)
        assert await child.exit_code() == 0, child.output

    create, get = rpc_lines(child.records)
    assert create["request_id"] == CALLERS_REQUEST_ID
    assert (create["method"], create["code"], create["level"]) == (CREATE_ORDER, "OK", "INFO")
    assert 0 < create["duration_ms"] < 5000
    assert (get["method"], get["code"]) == (GET_ORDER, "NOT_FOUND")
    # Made up when the caller sends none: a per-process random prefix and a counter.
    prefix, _, number = get["request_id"].partition("-")
    assert len(prefix) == 16 and number.isdigit()
    assert password not in child.output
    assert env["ORDERSTREAM_PAGE_TOKEN_KEY"] not in child.output


async def test_access_lines_are_written_while_the_process_serves(service_env, migrated):
    """Lines wait together for at most the flush interval, not for the stop."""
    env = process_env(service_env, ORDERSTREAM_MIGRATE_ON_START="false")
    async with service_process(env, "serve") as child:
        port = (await child.record("serving"))["port"]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            orders = order_service_pb2_grpc.OrderServiceStub(channel)
            for n in range(3):
                await orders.CreateOrder(
                    create_request(), metadata=(("x-request-id", f"req-running-{n}"),)
                )
            await child.record("rpc", timeout=10)
            await eventually(lambda: _logged(child, 3), what="an access line per call")
        assert child.process.returncode is None  # still serving
    assert [line["request_id"] for line in rpc_lines(child.records)] == [
        f"req-running-{n}" for n in range(3)
    ]


@pytest.fixture
def access_lines(monkeypatch) -> Iterator[io.StringIO]:
    """Where access lines go, as `logs.configure` would send them, in memory."""
    stream = io.StringIO()
    monkeypatch.setattr(logs, "_json_handler", logging.StreamHandler(stream))
    access_logger = logging.getLogger("service.access")
    previous = access_logger.level
    access_logger.setLevel(logging.INFO)  # setLevel, not the attribute: it clears the caches
    yield stream
    access_logger.setLevel(previous)


async def test_waiting_calls_are_written_at_the_bound_without_waiting_for_the_timer(
    access_lines,
):
    """A call only records its fields; at FLUSH_CALLS waiting calls their
    lines are built and written at once, in order, each with its own time."""
    stream = access_lines
    access = logs.AccessLog()
    count = logs.AccessLog.FLUSH_CALLS
    for n in range(count - 1):
        access.rpc(GET_ORDER, "OK", 0.0012345, f"req-{n}", None)
    assert stream.getvalue() == ""  # waiting for the timer
    access.rpc(GET_ORDER, "NOT_FOUND", 0.5, CALLERS_REQUEST_ID, "billing")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["request_id"] for line in lines] == [
        *(f"req-{n}" for n in range(count - 1)),
        CALLERS_REQUEST_ID,
    ]
    last = lines[-1]
    assert last.pop("time").endswith("Z")
    assert last == {
        "level": "INFO",
        "logger": "service.access",
        "message": "rpc",
        "pid": os.getpid(),
        "request_id": CALLERS_REQUEST_ID,
        "method": GET_ORDER,
        "code": "NOT_FOUND",
        "duration_ms": 500.0,
        "caller": "billing",
    }
    assert lines[0]["duration_ms"] == 1.234  # rounded to the microsecond
    access.flush()  # nothing left: the timer was cancelled with the flush
    assert len(stream.getvalue().splitlines()) == count


async def _logged(child: ServiceProcess, count: int) -> bool:
    return len(rpc_lines(child.records)) >= count


async def traced_run(env: dict[str, str], spans_file: Path) -> list[dict]:
    """Serves with stdout (where the console exporter writes) in a file,
    makes one traced call and stops; returns the spans printed."""
    with spans_file.open("wb") as stdout:
        async with service_process(env, "serve", stdout=stdout) as child:
            port = (await child.record("serving"))["port"]
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                orders = order_service_pb2_grpc.OrderServiceStub(channel)
                parent = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
                await orders.CreateOrder(create_request(), metadata=(("traceparent", parent),))
            child.process.send_signal(signal.SIGTERM)
            # The exporter flushes its queue on shutdown.
            assert await child.exit_code() == 0, child.output
    decoder, text, spans = json.JSONDecoder(), spans_file.read_text().strip(), []
    while text:
        span, end = decoder.raw_decode(text)
        spans.append(span)
        text = text[end:].lstrip()
    return spans


async def test_spans_for_rpcs_and_queries_when_otel_asks(service_env, migrated, tmp_path):
    env = process_env(
        service_env,
        ORDERSTREAM_MIGRATE_ON_START="false",
        OTEL_TRACES_EXPORTER="console",
        OTEL_SERVICE_NAME="orderstream-test",
    )
    spans = await traced_run(env, tmp_path / "spans.json")
    rpc = next(span for span in spans if span["name"] == CREATE_ORDER.lstrip("/"))
    assert rpc["kind"] == "SpanKind.SERVER"
    assert rpc["context"]["trace_id"] == "0x" + TRACE_ID  # continues the caller's trace
    assert rpc["attributes"]["rpc.method"] == "CreateOrder"
    assert rpc["resource"]["attributes"]["service.name"] == "orderstream-test"
    queries = [span for span in spans if span["attributes"].get("db.system") == "postgresql"]
    assert queries, spans
    assert any(span["parent_id"] == rpc["context"]["span_id"] for span in queries)


async def test_no_spans_without_otel_variables(service_env, migrated, tmp_path):
    env = process_env(service_env, ORDERSTREAM_MIGRATE_ON_START="false")
    for name in [name for name in env if name.startswith("OTEL_")]:
        del env[name]
    assert await traced_run(env, tmp_path / "spans.json") == []
