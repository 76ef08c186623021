"""`consume_events`: a durable consumer (or a member of a consumer group)
whose position the service keeps, acknowledged as the caller goes."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Iterable

import grpc

from orderstream.client._reopen import reopened
from orderstream.client._target import event_stub
from orderstream.events.v1.event_pb2 import Event
from orderstream.events.v1.event_service_pb2 import AckEventsRequest, StreamEventsRequest
from orderstream.events.v1.event_service_pb2_grpc import EventServiceStub


async def consume_events(
    target: EventServiceStub | grpc.aio.Channel,
    consumer: str,
    *,
    member: str = "",
    types: Iterable[str] = (),
    subject: str = "",
    ack_every: int = 100,
    reconnects: int = 5,
) -> AsyncIterator[Event]:
    """Yields the consumer's events from after its acknowledged position,
    following the feed until the caller stops iterating.

    An event counts as processed once the caller asks for the next one:
    every `ack_every` processed events, and at each progress message (a
    heartbeat while the filter matches nothing, the live end, a group's
    new partitions), the last processed position is acknowledged. Events
    not yet acknowledged when the caller stops, or the process dies, are
    sent again to the consumer's next stream: process them idempotently
    (by event id). With `member`, this is one member of the consumer's
    group (docs/streams.md#consumer-groups).

    A stream that ends UNAVAILABLE is reopened, up to `reconnects` times in
    a row without an event in between; other errors, and failed
    acknowledgements, are raised as `grpc.aio.AioRpcError`.

        async for event in consume_events(channel, "billing", types=["order.paid"]):
            handle(event)
    """
    stub = event_stub(target)
    wanted_types = list(types)
    processed = acked = 0  # positions
    unacked = 0  # events processed since the last acknowledgement

    async def acknowledge() -> None:
        nonlocal acked, unacked
        if processed > acked:
            await stub.AckEvents(
                AckEventsRequest(consumer=consumer, member=member, position=processed)
            )
            acked, unacked = processed, 0

    # The service starts each stream after the consumer's acknowledged
    # position, so every stream asks for the same thing.
    async def after_acknowledged() -> AsyncGenerator[Event, None]:
        nonlocal processed, unacked
        call = stub.StreamEvents(
            StreamEventsRequest(
                consumer=consumer,
                member=member,
                types=wanted_types,
                subject=subject,
                follow=True,
                progress=True,
            )
        )
        try:
            async for response in call:
                for event in response.events:
                    yield event
                    processed = max(processed, event.id)
                    unacked += 1
                    if unacked >= ack_every:
                        await acknowledge()
                if response.HasField("progress"):
                    # Every event up to it that matched was yielded above.
                    processed = max(processed, response.progress.position)
                    await acknowledge()
        finally:
            call.cancel()

    async with contextlib.aclosing(reopened(after_acknowledged, reconnects=reconnects)) as events:
        async for event in events:
            yield event
