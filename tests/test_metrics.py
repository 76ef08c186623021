"""The Prometheus endpoint, scraped over real HTTP from a second server with
its own pool: RPCs by method and code, latency, pool figures, active
streams, rows streamed and copied."""

from __future__ import annotations

import asyncio
import urllib.request

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from orderstream.events.v1 import event_pb2, event_service_pb2, event_service_pb2_grpc
from orderstream.orders.v1 import order_pb2, order_service_pb2, order_service_pb2_grpc
from service.ops import garbage
from tests.support.apps import app_with_channel, running_app
from tests.support.database import row_locked
from tests.support.polling import eventually
from tests.support.processes import serve_env, serving_process
from tests.support.requests import create_request, unique
from tests.support.status import rpc_error

GET_ORDER = "/orderstream.orders.v1.OrderService/GetOrder"
CREATE_ORDER = "/orderstream.orders.v1.OrderService/CreateOrder"
STREAM_EVENTS = "/orderstream.events.v1.EventService/StreamEvents"
UPLOAD_EVENTS = "/orderstream.events.v1.EventService/UploadEvents"


def _fetch(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


async def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample, keyed by name and sorted labels."""
    text = await asyncio.to_thread(_fetch, port)
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def new_event(subject: str, n: int) -> event_pb2.Event:
    return event_pb2.Event(type="test.metrics", source="/tests", subject=subject, json_payload="{}")


async def requests(subject: str, count: int):
    yield event_service_pb2.UploadEventsRequest(
        upload_id=unique("upload"), events=[new_event(subject, n) for n in range(count)]
    )


async def test_metrics_count_calls_codes_rows_and_the_pool(service_env):
    async with running_app(service_env, ORDERSTREAM_METRICS_PORT="0") as app:
        assert app.metrics_port
        before = await scrape(app.metrics_port)
        assert value(before, "orderstream_pool_size") >= 1
        assert value(before, "orderstream_pool_max_size") == 8
        assert value(before, "orderstream_pool_waiting") == 0

        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            orders = order_service_pb2_grpc.OrderServiceStub(channel)
            events = event_service_pb2_grpc.EventServiceStub(channel)
            order = await orders.CreateOrder(create_request())
            await orders.GetOrder(order_service_pb2.GetOrderRequest(id=order.id))
            missing = await rpc_error(
                orders.GetOrder(order_service_pb2.GetOrderRequest(id=order.id + 10**9))
            )
            assert missing.code == grpc.StatusCode.NOT_FOUND
            # Probes are not RPC traffic: health checks are not counted.
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())

            subject = unique("metrics")
            uploaded = await events.UploadEvents(requests(subject, 25))
            assert uploaded.event_count == 25

            history = events.StreamEvents(event_service_pb2.StreamEventsRequest(subject=subject))
            streamed = 0
            while (message := await history.read()) is not grpc.aio.EOF:
                streamed += len(message.events)
            assert streamed == 25
            # A follower stays open after the history: it is an active stream.
            follower = events.StreamEvents(
                event_service_pb2.StreamEventsRequest(subject=subject, follow=True)
            )
            assert len((await follower.read()).events) == 25
            during = await scrape(app.metrics_port)
            assert value(during, "orderstream_active_streams", method=STREAM_EVENTS) == 1
            follower.cancel()

            async def follower_ended() -> bool:
                samples = await scrape(app.metrics_port)
                return value(samples, "orderstream_active_streams", method=STREAM_EVENTS) == 0

            await eventually(follower_ended, what="the cancelled follower to end")
        after = await scrape(app.metrics_port)
    rpcs = "orderstream_rpcs_total"
    assert value(after, rpcs, method=CREATE_ORDER, code="OK") == 1
    assert value(after, rpcs, method=GET_ORDER, code="OK") == 1
    assert value(after, rpcs, method=GET_ORDER, code="NOT_FOUND") == 1
    assert value(after, rpcs, method=STREAM_EVENTS, code="OK") == 1
    assert value(after, rpcs, method=STREAM_EVENTS, code="CANCELLED") == 1
    assert value(after, "orderstream_rpc_duration_seconds_count", method=GET_ORDER) == 2
    assert value(after, "orderstream_rows_streamed_total", method=STREAM_EVENTS) == 50
    assert value(after, "orderstream_rows_copied_total", method=UPLOAD_EVENTS) == 25
    counted = {dict(labels).get("method") for name, labels in after if name == rpcs}
    assert counted == {CREATE_ORDER, GET_ORDER, STREAM_EVENTS, UPLOAD_EVENTS}


async def test_no_metrics_port_unless_configured(app):
    assert app.metrics_port is None


async def test_pool_figures_under_contention(service_env, admin_db):
    """Two connections busy on a locked row, a third call waiting for one."""
    async with app_with_channel(
        service_env,
        ORDERSTREAM_METRICS_PORT="0",
        ORDERSTREAM_POOL_MIN_SIZE="2",
        ORDERSTREAM_POOL_MAX_SIZE="2",
    ) as (app, channel):
        orders = order_service_pb2_grpc.OrderServiceStub(channel)
        order = await orders.CreateOrder(create_request())
        paying = order_service_pb2.UpdateOrderStatusRequest(
            id=order.id, status=order_pb2.ORDER_STATUS_PAID
        )
        async with row_locked(admin_db, order.id):
            calls = [orders.UpdateOrderStatus(paying, timeout=30) for _ in range(3)]

            async def two_busy_one_waiting() -> bool:
                samples = await scrape(app.metrics_port)
                return (
                    value(samples, "orderstream_pool_in_use") == 2
                    and value(samples, "orderstream_pool_idle") == 0
                    and value(samples, "orderstream_pool_waiting") == 1
                )

            await eventually(two_busy_one_waiting, what="two calls busy and one waiting")
        # One pays; the others find the order PAID already.
        codes = [(await call.code()) for call in calls]
        assert sorted(code.name for code in codes) == ["FAILED_PRECONDITION"] * 2 + ["OK"]
        after = await scrape(app.metrics_port)
    assert value(after, "orderstream_pool_waiting") == 0
    assert value(after, "orderstream_pool_in_use") == 0


async def test_a_served_process_freezes_its_start_up_objects_and_spaces_collections(
    service_env, login
):
    """The process as deployed (service/ops/garbage.py): what exists once
    the modules are imported is out of the collector's reach, young
    collections are spaced out, and the collections are counted by
    generation."""
    env = serve_env(service_env, login, grace=1, event_loop=None)
    env["ORDERSTREAM_METRICS_PORT"] = "0"
    async with serving_process(env) as (child, _, _):
        samples = await scrape((await child.record("serving"))["metrics_port"])
    assert value(samples, "orderstream_gc_frozen_objects") > 10_000
    assert value(samples, "orderstream_gc_threshold", generation="0") == garbage.YOUNG_THRESHOLD
    assert ("python_gc_collections_total", (("generation", "2"),)) in samples
