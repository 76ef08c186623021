"""`upload_events`: an UploadEvents client stream, batched under a byte
budget and retried with the same upload_id."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Iterable

import grpc

from orderstream.client._target import backoff, event_stub, lost_connection, new_request_id
from orderstream.events.v1.event_pb2 import Event
from orderstream.events.v1.event_service_pb2 import UploadEventsRequest, UploadEventsResponse
from orderstream.events.v1.event_service_pb2_grpc import EventServiceStub

#: Serialized size one UploadEventsRequest aims to stay under: far below
#: gRPC's default 4 MiB message limit, large enough to amortise per-message
#: costs over hundreds of events.
DEFAULT_BATCH_BYTES = 1 << 20

# A repeated message field costs one tag byte and a length varint of at most
# five bytes on top of the element itself.
_FIELD_OVERHEAD = 6


async def upload_requests(
    events: Iterable[Event] | AsyncIterable[Event],
    upload_id: str,
    *,
    max_bytes: int = DEFAULT_BATCH_BYTES,
) -> AsyncIterator[UploadEventsRequest]:
    """Packs events into requests of at most `max_bytes` serialized bytes
    (an event larger than that travels alone); only the first request
    carries `upload_id`, and there always is a first one.

        async for request in upload_requests(events, "import-2026-11-24"):
            print(request.ByteSize(), len(request.events))
    """
    batch: list[Event] = []
    size = len(UploadEventsRequest(upload_id=upload_id).SerializeToString())
    first = True
    async for event in _aiter(events):
        cost = event.ByteSize() + _FIELD_OVERHEAD
        if batch and size + cost > max_bytes:
            yield UploadEventsRequest(upload_id=upload_id if first else "", events=batch)
            batch, size, first = [], 0, False
        batch.append(event)
        size += cost
    if batch or first:
        yield UploadEventsRequest(upload_id=upload_id if first else "", events=batch)


async def upload_events(
    target: EventServiceStub | grpc.aio.Channel,
    events: Iterable[Event] | AsyncIterable[Event],
    *,
    upload_id: str | None = None,
    max_bytes: int = DEFAULT_BATCH_BYTES,
    attempts: int = 5,
    timeout: float | None = None,
) -> UploadEventsResponse:
    """Uploads `events` all or nothing as one UploadEvents call.

    On UNAVAILABLE (or a message that grpc.aio could not write because the
    connection went) the whole upload is sent again with the same `upload_id`
    (a fresh one when None), up to `attempts` times: the server commits an
    upload id at most once and answers a repeat with the first result, so a
    retry after a lost response cannot write twice. To re-send, the messages
    already built stay in memory until the upload is acknowledged; split
    very large loads into several uploads. Other errors are raised as
    `grpc.aio.AioRpcError`.

        response = await upload_events(channel, (make_event(n) for n in range(10_000)))
        print(response.event_count, response.first_event_id, response.last_event_id)
    """
    if attempts < 1:
        raise ValueError("upload_events: attempts must be at least 1")
    stub = event_stub(target)
    key = upload_id or new_request_id("upload")
    sent: list[UploadEventsRequest] = []
    source = upload_requests(events, key, max_bytes=max_bytes)
    for attempt in range(1, attempts + 1):
        try:
            return await _send(stub, sent, source, timeout)
        except grpc.aio.AioRpcError as error:
            if not lost_connection(error) or attempt == attempts:
                raise
        await asyncio.sleep(backoff(attempt))
    raise AssertionError("unreachable: the last attempt returns or raises")


async def _send(
    stub: EventServiceStub,
    sent: list[UploadEventsRequest],
    source: AsyncIterator[UploadEventsRequest],
    timeout: float | None,
) -> UploadEventsResponse:
    """One attempt: replays what earlier attempts sent, then continues the source."""
    call = stub.UploadEvents(timeout=timeout)
    try:
        for request in sent:
            await call.write(request)
        async for request in source:
            sent.append(request)
            await call.write(request)
        await call.done_writing()
        response: UploadEventsResponse = await call
        return response
    finally:
        # A failing source (or a cancelled caller) must end the call, so the
        # server rolls the upload back instead of waiting for more messages.
        call.cancel()


async def _aiter(events: Iterable[Event] | AsyncIterable[Event]) -> AsyncIterator[Event]:
    if isinstance(events, AsyncIterable):
        async for event in events:
            yield event
    else:
        for event in events:
            yield event
