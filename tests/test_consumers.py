"""Durable consumers: the position the service keeps survives the process
that served the stream, moves only forward, and no further than was sent;
progress messages; the lag metric; the admin RPCs."""

from __future__ import annotations

import grpc
import pytest

from devcluster.process import process_env, service_process
from orderstream.events.v1 import event_service_pb2, event_service_pb2_grpc
from tests.support.apps import app_with_channel
from tests.support.calls import publish, read_all
from tests.support.polling import eventually
from tests.support.requests import unique
from tests.support.status import rpc_error

pytestmark = pytest.mark.through_pgbouncer

Request = event_service_pb2.StreamEventsRequest


async def consume(events, request: Request, count: int) -> list[int]:
    """The ids of the first `count` events a stream sends, then cancels it."""
    call = events.StreamEvents(request, timeout=60)
    received: list[int] = []
    try:
        async for message in call:
            received.extend(e.id for e in message.events)
            if len(received) >= count:
                return received
    finally:
        call.cancel()
    return received


async def test_a_consumer_resumes_on_another_process_right_after_its_acknowledgement(
    service_env, events
):
    """600 of 1,000 acknowledged, the process killed: the session's own
    service (through PgBouncer in the [pgbouncer] run) resumes at 601."""
    consumer, subject = unique("billing"), unique("consumed/")
    ids = await publish(events, subject, 1000)
    env = process_env(service_env, ORDERSTREAM_MIGRATE_ON_START="false")
    async with service_process(env, "serve") as child:
        port = (await child.record("serving", timeout=60))["port"]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            other = event_service_pb2_grpc.EventServiceStub(channel)
            request = Request(consumer=consumer, subject=subject, follow=True)
            assert await consume(other, request, 1000) == ids
            acked = await other.AckEvents(
                event_service_pb2.AckEventsRequest(consumer=consumer, position=ids[599])
            )
            assert acked.position == ids[599]
        child.process.kill()
        await child.exit_code()

    # A lower acknowledgement (a late retry) leaves the position where it was.
    lower = await events.AckEvents(
        event_service_pb2.AckEventsRequest(consumer=consumer, position=ids[10])
    )
    assert lower.position == ids[599]
    received, _ = await read_all(events.StreamEvents(Request(consumer=consumer, subject=subject)))
    assert [e.id for e in received] == ids[600:]


async def test_an_acknowledgement_past_what_was_sent_is_refused(events):
    consumer, subject = unique("billing"), unique("consumed/")
    ids = await publish(events, subject, 5)
    await read_all(events.StreamEvents(Request(consumer=consumer, subject=subject)))
    past = event_service_pb2.AckEventsRequest(consumer=consumer, position=ids[-1] + 1)
    error = await rpc_error(events.AckEvents(past))
    assert error.code == grpc.StatusCode.OUT_OF_RANGE
    assert error.error_info is not None
    assert error.error_info.reason == "ACK_PAST_DELIVERED"
    assert error.error_info.metadata["delivered"] == str(ids[-1])
    ok = event_service_pb2.AckEventsRequest(consumer=consumer, position=ids[-1])
    assert (await events.AckEvents(ok)).position == ids[-1]

    unknown = event_service_pb2.AckEventsRequest(consumer=unique("nobody"), position=1)
    error = await rpc_error(events.AckEvents(unknown))
    assert (error.code, error.error_info.reason) == (
        grpc.StatusCode.NOT_FOUND,
        "CONSUMER_NOT_FOUND",
    )
    error = await rpc_error(events.AckEvents(event_service_pb2.AckEventsRequest(position=0)))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert set(error.violations) == {"consumer", "position"}


async def test_an_explicit_after_id_overrides_the_stored_position(events):
    consumer, subject = unique("billing"), unique("consumed/")
    ids = await publish(events, subject, 10)
    await read_all(events.StreamEvents(Request(consumer=consumer, subject=subject)))
    await events.AckEvents(event_service_pb2.AckEventsRequest(consumer=consumer, position=ids[7]))
    received, _ = await read_all(
        events.StreamEvents(Request(consumer=consumer, subject=subject, after_id=ids[2]))
    )
    assert [e.id for e in received] == ids[3:]


async def test_progress_marks_the_live_end_and_beats_while_nothing_matches(service_env):
    """A consumer filtering for a type nobody writes is still told the
    position, and may acknowledge that far."""
    consumer = unique("quiet")
    async with app_with_channel(service_env, ORDERSTREAM_HEARTBEAT_INTERVAL="0.2") as (_, channel):
        stub = event_service_pb2_grpc.EventServiceStub(channel)
        request = Request(
            consumer=consumer, types=[unique("never.written")], follow=True, progress=True
        )
        call = stub.StreamEvents(request, timeout=60)
        try:
            first = await call.read()
            assert not first.events
            assert first.progress.caught_up
            ids = await publish(stub, unique("other/"), 3)
            while True:
                message = await call.read()
                assert not message.events and not message.progress.caught_up
                if message.progress.position >= ids[-1]:
                    break
        finally:
            call.cancel()
        acked = await stub.AckEvents(
            event_service_pb2.AckEventsRequest(
                consumer=consumer, position=message.progress.position
            )
        )
        assert acked.position == message.progress.position


async def test_a_history_stream_ends_by_telling_its_position(events):
    """Without `follow`, a stream whose last event was not its position
    ends with one progress message: where a consumer may acknowledge."""
    consumer, subject = unique("history"), unique("consumed/")
    ids = await publish(events, subject, 3)
    call = events.StreamEvents(
        Request(consumer=consumer, types=[unique("never.written")], progress=True)
    )
    messages = [message async for message in call]
    assert len(messages) == 1 and not messages[0].events
    assert messages[0].progress.position >= ids[-1]
    assert not messages[0].progress.caught_up
    acked = await events.AckEvents(
        event_service_pb2.AckEventsRequest(
            consumer=consumer, position=messages[0].progress.position
        )
    )
    assert acked.position == messages[0].progress.position


async def test_a_stream_without_progress_sends_only_events(events):
    """Callers from before `progress` never see a message without events."""
    subject = unique("consumed/")
    await publish(events, subject, 3)
    received, messages = await read_all(
        events.StreamEvents(Request(consumer=unique("old-client"), types=["none.such"]))
    )
    assert (received, messages) == ([], 0)


async def test_the_lag_metric_reads_400_then_0(service_env):
    consumer, subject = unique("lagging"), unique("consumed/")
    async with app_with_channel(service_env, ORDERSTREAM_CONSUMER_LAG_INTERVAL="0.05") as (
        app,
        channel,
    ):
        stub = event_service_pb2_grpc.EventServiceStub(channel)
        ids = await publish(stub, subject, 1000)
        assert await consume(stub, Request(consumer=consumer, subject=subject), 1000) == ids

        def lag() -> float | None:
            return app.metrics.registry.get_sample_value(
                "orderstream_consumer_lag_events", {"consumer": consumer}
            )

        async def lag_is(expected: int) -> bool:
            return lag() == expected

        await stub.AckEvents(
            event_service_pb2.AckEventsRequest(consumer=consumer, position=ids[599])
        )
        await eventually(lambda: lag_is(400), what="the lag to read 400")
        await stub.AckEvents(
            event_service_pb2.AckEventsRequest(consumer=consumer, position=ids[-1])
        )
        await eventually(lambda: lag_is(0), what="the lag to read 0")
        seconds = app.metrics.registry.get_sample_value(
            "orderstream_consumer_lag_seconds", {"consumer": consumer}
        )
        assert seconds == 0


async def test_admin_lists_describes_and_resets_consumers(events):
    consumer, subject = unique("admin"), unique("consumed/")
    ids = await publish(events, subject, 10)
    await read_all(events.StreamEvents(Request(consumer=consumer, subject=subject)))
    await events.AckEvents(event_service_pb2.AckEventsRequest(consumer=consumer, position=ids[-1]))

    described = await events.GetConsumer(event_service_pb2.GetConsumerRequest(name=consumer))
    assert (described.name, described.position, described.delivered) == (
        consumer,
        ids[-1],
        ids[-1],
    )
    assert described.HasField("ack_time") and described.create_time.seconds > 0
    listed = await events.ListConsumers(event_service_pb2.ListConsumersRequest())
    assert consumer in [c.name for c in listed.consumers]

    reset = await events.ResetConsumer(
        event_service_pb2.ResetConsumerRequest(name=consumer, position=ids[4])
    )
    assert reset.position == ids[4]
    assert reset.lag_events >= 5
    received, _ = await read_all(events.StreamEvents(Request(consumer=consumer, subject=subject)))
    assert [e.id for e in received] == ids[5:]

    error = await rpc_error(
        events.ResetConsumer(
            event_service_pb2.ResetConsumerRequest(name=consumer, position=ids[-1] + 10**9)
        )
    )
    assert (error.code, error.error_info.reason) == (
        grpc.StatusCode.OUT_OF_RANGE,
        "POSITION_NOT_FINAL",
    )
    error = await rpc_error(
        events.GetConsumer(event_service_pb2.GetConsumerRequest(name=unique("nobody")))
    )
    assert error.code == grpc.StatusCode.NOT_FOUND
