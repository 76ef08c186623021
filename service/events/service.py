"""EventService: publish and read events of the global feed."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import grpc

from orderstream.events.v1 import event_pb2, event_service_pb2, event_service_pb2_grpc
from service.db.codecs import unix_micros
from service.db.point_reads import PointReads
from service.db.runner import Database
from service.errors import FieldViolation, ServiceError, event_not_found, invalid_argument
from service.events import consumers, sql
from service.events.convert import event_from_row
from service.events.feed import EventFeed
from service.events.origin import refusal
from service.events.payload import InvalidPayload, json_object_text, written_out_too_large
from service.events.stream import stream_events
from service.events.uploads import upload_events
from service.rpc import write_limits
from service.rpc.boundary import rpc
from service.rpc.request_keys import body_digest, concurrent_request, request_id_reused
from service.rpc.validation import MAX_ID_LENGTH, Violations, require_positive_id
from service.streams.limits import StreamSlots, StreamTimeouts

MAX_PUBLISH_EVENTS = 1000


class EventRows:
    """Column arrays for one multi-row insert, filled event by event."""

    def __init__(self) -> None:
        self.types: list[str] = []
        self.sources: list[str] = []
        self.subjects: list[str] = []
        self.times: list[int | None] = []
        self.payloads: list[str] = []

    def add(self, field: str, event: event_pb2.Event, v: Violations) -> None:
        """Checks `event` (reported under `field`) and appends it if valid."""
        before = v.count
        v.text(f"{field}.type", event.type, max_length=256)
        v.text(f"{field}.source", event.source, max_length=1024)
        v.text(f"{field}.subject", event.subject, max_length=1024, required=False)
        has_time = event.HasField("time")
        if has_time:
            v.timestamp(f"{field}.time", event.time)
        kind = event.WhichOneof("payload") or "json_payload"
        try:
            payload = json_object_text(event)
        except InvalidPayload as exc:
            v.add(f"{field}.{kind}", str(exc))
            return
        if v.count != before:
            return
        self.types.append(event.type)
        self.sources.append(event.source)
        self.subjects.append(event.subject)
        self.times.append(unix_micros(event.time) if has_time else None)
        self.payloads.append(payload)


class EventService(event_service_pb2_grpc.EventServiceServicer):
    def __init__(
        self,
        db: Database,
        *,
        streams: StreamSlots,
        followers: StreamSlots,
        timeouts: StreamTimeouts,
        feed: EventFeed,
        batch_bytes: int,
        max_upload_events: int,
        heartbeat_interval: float,
        member_timeout: float,
    ) -> None:
        """`batch_bytes` bounds a StreamEvents message; `max_upload_events`
        an upload; `heartbeat_interval` is how long a stream with `progress`
        stays silent while its filter matches nothing; `member_timeout` how long a
        group member unseen stays in its group."""
        self._db = db
        # GetEvent calls that arrive together share a statement.
        self._events_by_id = PointReads(db, sql.GET_EVENTS)
        self._streams = streams
        self._followers = followers
        self._timeouts = timeouts
        self._feed = feed
        self._batch_bytes = batch_bytes
        self._max_upload_events = max_upload_events
        self._heartbeat_interval = heartbeat_interval
        self._member_timeout = member_timeout

    @rpc
    async def PublishEvents(
        self, request: event_service_pb2.PublishEventsRequest, context: grpc.aio.ServicerContext
    ) -> event_service_pb2.PublishEventsResponse:
        v = Violations()
        v.text("request_id", request.request_id, max_length=MAX_ID_LENGTH, required=False)
        if not 1 <= len(request.events) <= MAX_PUBLISH_EVENTS:
            v.add(
                "events", f"must hold 1 to {MAX_PUBLISH_EVENTS} events, got {len(request.events)}"
            )
        v.raise_if_any()
        # Who may write these comes first, as it does in an upload's rows.
        limits = write_limits.current()
        for n, event in enumerate(request.events):
            if denied := refusal(f"events[{n}]", event.type, event.source, limits):
                raise denied
        rows = EventRows()
        for n, event in enumerate(request.events):
            rows.add(f"events[{n}]", event, v)
        v.raise_if_any()
        columns = (rows.types, rows.sources, rows.subjects, rows.times, rows.payloads)
        digest = body_digest(request) if request.request_id else b""
        try:
            if request.request_id:
                records = await self._db.fetch(
                    context, sql.PUBLISH_KEYED_EVENTS, *columns, request.request_id, digest
                )
            else:
                records = await self._db.fetch(context, sql.PUBLISH_EVENTS, *columns)
        except asyncpg.CheckViolationError as exc:
            if exc.constraint_name != "events_payload_size":
                raise
            raise await self._oversized(request, rows.payloads, context) or exc from None
        except asyncpg.UniqueViolationError as exc:
            if exc.constraint_name != "publish_requests_pkey":
                raise
            return await self._replay(request.request_id, digest, context)
        self._feed.announce()
        return event_service_pb2.PublishEventsResponse(ids=sorted(r["id"] for r in records))

    async def _replay(
        self, request_id: str, digest: bytes, context: grpc.aio.ServicerContext
    ) -> event_service_pb2.PublishEventsResponse:
        """Answers a repeated request_id: the first call's ids, or ALREADY_EXISTS."""
        row = await self._db.fetchrow(context, sql.PUBLISH_REQUEST, request_id)
        if row is None:
            raise concurrent_request()
        if row["request_hash"] != digest:
            raise request_id_reused(f"{len(row['event_ids'])} published events")
        return event_service_pb2.PublishEventsResponse(ids=row["event_ids"])

    async def _oversized(
        self,
        request: event_service_pb2.PublishEventsRequest,
        payloads: list[str],
        context: grpc.aio.ServicerContext,
    ) -> ServiceError | None:
        """The events whose payloads the table refused as too large once
        written out (the caller's fault, so INVALID_ARGUMENT naming each),
        measured by the database that refused them. Every event of the
        request passed the Python checks, so `payloads` lines up with it."""
        found = await self._db.fetch(context, sql.OVERSIZED_PAYLOADS, payloads)
        if not found:
            return None
        violations = []
        for row in found:
            index = row["index"]
            kind = request.events[index].WhichOneof("payload") or "json_payload"
            violations.append(
                FieldViolation(f"events[{index}].{kind}", written_out_too_large(row["bytes"]))
            )
        return invalid_argument(violations)

    @rpc
    async def GetEvent(
        self, request: event_service_pb2.GetEventRequest, context: grpc.aio.ServicerContext
    ) -> event_pb2.Event:
        require_positive_id("id", request.id)
        row = await self._events_by_id.get(context, request.id, event_not_found)
        return event_from_row(row)

    @rpc
    async def UploadEvents(
        self,
        request_iterator: AsyncIterator[event_service_pb2.UploadEventsRequest],
        context: grpc.aio.ServicerContext,
    ) -> event_service_pb2.UploadEventsResponse:
        return await upload_events(
            self._db,
            self._streams,
            self._timeouts,
            request_iterator,
            context,
            max_events=self._max_upload_events,
            on_commit=self._feed.announce,
        )

    @rpc
    async def StreamEvents(  # type: ignore[override]  # writes via context.write
        self, request: event_service_pb2.StreamEventsRequest, context: grpc.aio.ServicerContext
    ) -> None:
        await stream_events(
            self._db,
            request,
            context,
            streams=self._streams,
            followers=self._followers,
            feed=self._feed,
            batch_bytes=self._batch_bytes,
            write_stall_timeout=self._timeouts.write_stall,
            heartbeat_interval=self._heartbeat_interval,
            member_timeout=self._member_timeout,
        )

    @rpc
    async def AckEvents(
        self, request: event_service_pb2.AckEventsRequest, context: grpc.aio.ServicerContext
    ) -> event_service_pb2.AckEventsResponse:
        return await consumers.acknowledge(self._db, context, request)

    @rpc
    async def ListConsumers(
        self, request: event_service_pb2.ListConsumersRequest, context: grpc.aio.ServicerContext
    ) -> event_service_pb2.ListConsumersResponse:
        return await consumers.list_consumers(self._db, context)

    @rpc
    async def GetConsumer(
        self, request: event_service_pb2.GetConsumerRequest, context: grpc.aio.ServicerContext
    ) -> event_service_pb2.Consumer:
        return await consumers.describe(
            self._db, context, request.name, member_timeout=self._member_timeout
        )

    @rpc
    async def ResetConsumer(
        self, request: event_service_pb2.ResetConsumerRequest, context: grpc.aio.ServicerContext
    ) -> event_service_pb2.Consumer:
        return await consumers.reset(
            self._db, context, request, member_timeout=self._member_timeout
        )
