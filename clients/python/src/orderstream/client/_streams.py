"""`stream_events`: StreamEvents one event at a time, resumed after a
dropped connection from the last event handed out."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Iterable

import grpc

from orderstream.client._reopen import reopened
from orderstream.client._target import event_stub
from orderstream.events.v1.event_pb2 import Event
from orderstream.events.v1.event_service_pb2 import StreamEventsRequest
from orderstream.events.v1.event_service_pb2_grpc import EventServiceStub


async def stream_events(
    target: EventServiceStub | grpc.aio.Channel,
    *,
    after_id: int = 0,
    types: Iterable[str] = (),
    subject: str = "",
    follow: bool = False,
    reconnects: int = 5,
) -> AsyncIterator[Event]:
    """Yields the events after `after_id` in feed order, one by one.

    When the stream ends with UNAVAILABLE (connection lost, replica shutting
    down), a new StreamEvents call resumes after the id of the last event
    yielded: the feed is ordered by id, so that is neither a gap nor a
    duplicate. Up to `reconnects` attempts in a row are made without
    receiving anything; each event received resets the count. Other errors
    are raised as `grpc.aio.AioRpcError`. With `follow`, the stream runs
    until the caller stops iterating.

        async for event in stream_events(channel, subject="orders/42", follow=True):
            handle(event)
    """
    stub = event_stub(target)
    wanted_types = list(types)
    last_id = after_id

    async def after_last_id() -> AsyncGenerator[Event, None]:
        call = stub.StreamEvents(
            StreamEventsRequest(
                after_id=last_id, types=wanted_types, subject=subject, follow=follow
            )
        )
        try:
            async for response in call:
                for event in response.events:
                    yield event
        finally:
            # Ends the call when the caller stops iterating early.
            call.cancel()

    async with contextlib.aclosing(reopened(after_last_id, reconnects=reconnects)) as events:
        async for event in events:
            last_id = event.id
            yield event
