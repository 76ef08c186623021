"""UploadEvents: a client stream of events loaded through COPY, all or nothing.

One transaction per upload: claim the upload_id in `uploads`, create a
temporary staging table (dropped at commit or rollback), COPY the events
into it straight from the request stream, then move them into `events` with
one INSERT ... SELECT in stream order and record the response in the claim,
commit. A bad event, a cancel, the deadline or a broken stream aborts the
COPY, and the rollback takes the claim with it: nothing of the upload is
visible, and the upload_id is free for a retry.

Why staging. Every statement that inserts into `events` announces itself
to the feed (migrations 0002/0004): its shared advisory lock holds the safe
horizon, and so every follower and history read on every replica, below its
ids until its transaction ends. A COPY straight into `events` would take
that lock when the stream starts and hold it for as long as the client
takes to send, so one stalled client froze the feed. The COPY into the
staging table takes no feed lock; the lock lives only from the move to the
commit, paced by the server. The price is writing every row twice (staging
and `events`); see docs/streams.md for the measured cost.

Idempotency. The claim is an INSERT ... ON CONFLICT DO NOTHING on the
uploads primary key. A second upload with the same id waits on that index
until the first one ends: if it committed, the second reads its own
stream to the end, dropping it, and returns the stored response; if it
rolled back, the second loads its events. So two uploads with one upload_id never both commit, and
concurrent callers get the same response. (A wait longer than the statement
timeout ends in ABORTED with RetryInfo.)

Validation. PostgreSQL checks the rows as they stream through COPY, in C:
text columns refuse NUL bytes, jsonb refuses bad JSON and \\u0000, and CHECK
constraints (0001, 0003, 0004) enforce the object payload, the required
fields, the length limits and the payload's written-out size. The staging
table is made LIKE `events` with its defaults, CHECK constraints (under
their names) and generated column, so it refuses exactly what `events`
would, and a constraint added to `events` later applies to uploads at once.
Its error names the COPY row ("COPY upload_events, line 5, column payload")
and the column or constraint, which `_explain` maps back to
`messages[i].events[j].<field>`. Python checks only what the
table cannot: who may write the event (service/events/origin.py: the
reserved order types and source, and the caller's own limits, which the
table does not know; about 90 ns per row, measured with `_event_rows` on
1000-event messages, 1-2% of an upload's time per row), the Timestamp's
range, and payloads that need the slow path
(Struct payloads, missing ones, and texts of 1000 characters or more, where
PublishEvents' own checks run so that nesting depth agrees exactly and an
oversized payload ends the call at once; a shorter text cannot nest deeply
enough for the two parsers to disagree). The payload's size as written
out, which a short text of huge exponents (`1e131071`) multiplies, is the
table's to bound: its events_payload_size CHECK refuses every row over
the limit, whatever Python looked at. The alternative, PublishEvents' checks
in Python for every row
disagree). The alternative, PublishEvents' checks in Python for every row
(a json.loads each), measured end to end on the 2-core development machine
(1M events with a small JSON payload, 1000 per message; client and server
in separate uvloop processes; best of 3; COPY then went straight into
`events`):

    PostgreSQL validates:  173k rows/s = 1.02 x psql \\copy of the same rows
    Python validates:      140k rows/s = 0.83 x psql \\copy

The price: asyncpg looks at COPY's outcome only after the records run out,
so a row PostgreSQL rejects is reported once the client has sent its whole
stream (the rest is read and dropped); a row Python rejects ends the call
at once.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable, Sequence

import asyncpg
import grpc

from orderstream.events.v1 import event_pb2, event_service_pb2
from service.db.runner import Database
from service.errors import FieldViolation, Reason, ServiceError, invalid_argument
from service.events.origin import RESERVED_TYPE_PREFIX, SERVICE_SOURCE, refusal
from service.events.payload import InvalidPayload, json_object_text, written_out_too_large
from service.rpc import write_limits
from service.rpc.validation import MAX_TIMESTAMP_SECONDS, MIN_TIMESTAMP_SECONDS
from service.streams.limits import StreamSlots, StreamTimeouts
from service.streams.loads import LoadSpec, MessagePositions, run_load

_COLUMNS = ("type", "source", "subject", "time", "payload")

# json_payload texts at least this long are checked in Python first (see above).
_PYTHON_CHECKED_PAYLOAD_CHARS = 1000

# Also reads the transaction's start, now(): events without a `time` get
# it, as PublishEvents' do, computed once per upload instead of per row.
_CLAIM = """
INSERT INTO uploads (upload_id, event_count, first_event_id, last_event_id)
VALUES ($1, 0, 0, 0)
ON CONFLICT (upload_id) DO NOTHING
RETURNING now() AS now
"""

_STORED = """
SELECT event_count, first_event_id, last_event_id FROM uploads WHERE upload_id = $1
"""

_STAGING_TABLE = "upload_events"

# LIKE events: the same columns, defaults, generated payload_bytes and CHECK
# constraints under the same names (which `_explain` maps to fields), so the
# rows are checked in C as they stream, as `events` would check them. Its
# own identity (INCLUDING IDENTITY makes a new sequence, 1, 2, ...) numbers
# the rows in stream order. NOT NULL always comes with LIKE.
_CREATE_STAGING = f"""
CREATE TEMP TABLE {_STAGING_TABLE} (
    LIKE events INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING GENERATED
        INCLUDING IDENTITY
) ON COMMIT DROP
"""

# One statement moves the upload into events: the only one of the upload
# that announces itself to the feed. Ids are drawn as the sorted rows are
# inserted, so they ascend in stream order (interleaved with whatever
# concurrent writers draw meanwhile, as before).
_MOVE = f"""
WITH moved AS (
    INSERT INTO events (type, source, subject, time, payload)
    SELECT type, source, subject, time, payload
    FROM pg_temp.{_STAGING_TABLE}
    ORDER BY id
    RETURNING id
)
UPDATE uploads
SET event_count = m.event_count, first_event_id = m.first_event_id,
    last_event_id = m.last_event_id
FROM (
    SELECT count(*) AS event_count, min(id) AS first_event_id, max(id) AS last_event_id
    FROM moved
) AS m
WHERE upload_id = $1
RETURNING uploads.event_count, uploads.first_event_id, uploads.last_event_id
"""

# PostgreSQL's outermost error context names the COPY row (1-based) and,
# for errors while reading a value, the column. Only the last context line
# is trusted: the JSON parser's line before it quotes the caller's payload.
_COPY_CONTEXT = re.compile(rf"(?:\A|\n)COPY {_STAGING_TABLE}, line (\d+)(?:, column (\w+))?\Z")

_COLUMN_FIELDS = {
    "type": "type",
    "source": "source",
    "subject": "subject",
    "time": "time",
    "payload": "json_payload",
}

_CONSTRAINT_VIOLATIONS = {
    "events_type_required": ("type", "required"),
    "events_type_length": ("type", "at most 256 characters"),
    "events_source_required": ("source", "required"),
    "events_source_length": ("source", "at most 1024 characters"),
    "events_subject_length": ("subject", "at most 1024 characters"),
    "events_payload_check": ("json_payload", "must be a JSON object"),
    "events_payload_size": ("json_payload", written_out_too_large()),
}

# SQLSTATE classes that describe the data of the row being copied: data
# exception, integrity constraint violation, program limit (nesting depth).
# Anything else (cancel, deadlock, lost connection) goes to service/rpc/status_map.py.
_ROW_ERROR_CLASSES = ("22", "23", "54")


def _describe(sqlstate: str, column: str, exc: asyncpg.PostgresError) -> str:
    if sqlstate == "22021":  # protobuf strings are UTF-8: the bad byte can only be NUL
        return "must not contain a NUL character"
    if sqlstate == "22P05":
        return "must not contain a NUL character (\\u0000)"
    if sqlstate == "22P02" and column == "payload":
        return f"not valid JSON: {exc.detail or exc.message}"[:240]
    if sqlstate == "54001":
        return "nested too deeply"
    return f"rejected by the database: {exc.message}"[:240]


def _event_rows(
    events: Sequence[event_pb2.Event], message: int, claimed: asyncpg.Record
) -> list[tuple[str, str, str, int, str]]:
    """One tuple per event of message `message`. This loop runs for every
    row, so it does no more than it must; see the module docstring for who
    checks what."""
    now = claimed["now"]
    limits = write_limits.current()
    rows: list[tuple[str, str, str, int, str]] = []
    append = rows.append
    for index, event in enumerate(events):
        event_type = event.type
        source = event.source
        if (
            event_type.startswith(RESERVED_TYPE_PREFIX)
            or source == SERVICE_SOURCE
            or limits is not None
        ):
            denied = refusal(f"messages[{message}].events[{index}]", event_type, source, limits)
            if denied is not None:
                raise denied
        payload = event.json_payload
        if not payload or len(payload) >= _PYTHON_CHECKED_PAYLOAD_CHARS:
            payload = _checked_payload(event, message, index)
        if event.HasField("time"):
            stamp = event.time
            seconds = stamp.seconds
            nanos = stamp.nanos
            if not (
                MIN_TIMESTAMP_SECONDS <= seconds <= MAX_TIMESTAMP_SECONDS
                and 0 <= nanos <= 999_999_999
            ):
                raise _invalid(message, index, "time", "must lie between 0001-01-01 and 9999-12-31")
            time = seconds * 1_000_000 + nanos // 1000
        else:
            time = now
        append((event_type, source, event.subject, time, payload))
    return rows


def _checked_payload(event: event_pb2.Event, message: int, index: int) -> str:
    try:
        return json_object_text(event)
    except InvalidPayload as exc:
        kind = event.WhichOneof("payload") or "json_payload"
        raise _invalid(message, index, kind, str(exc)) from None


def _invalid(message: int, index: int, field: str, description: str) -> ServiceError:
    return invalid_argument(
        [FieldViolation(f"messages[{message}].events[{index}].{field}", description)]
    )


def _explain(exc: asyncpg.PostgresError, positions: MessagePositions) -> ServiceError | None:
    """The event behind a COPY error, or None if the error is not about one
    row's data."""
    sqlstate = exc.sqlstate or ""
    if sqlstate[:2] not in _ROW_ERROR_CLASSES:
        return None
    match = _COPY_CONTEXT.search(exc.context or "")
    if match is None or not 1 <= int(match[1]) <= positions.rows:
        return None
    message, index = positions.locate(int(match[1]) - 1)
    event = f"messages[{message}].events[{index}]"
    column = match[2]
    if column is not None:
        field = f"{event}.{_COLUMN_FIELDS.get(column, column)}"
        description = _describe(sqlstate, column, exc)
    elif exc.constraint_name in _CONSTRAINT_VIOLATIONS:
        name, description = _CONSTRAINT_VIOLATIONS[exc.constraint_name]
        field = f"{event}.{name}"
    else:  # a rule added to the table later: at least name the event
        field = event
        description = f"rejected by the database: {exc.message}"[:240]
    return invalid_argument([FieldViolation(field, description)])


_UPLOAD: LoadSpec[event_service_pb2.UploadEventsRequest, event_service_pb2.UploadEventsResponse] = (
    LoadSpec(
        key_name="upload_id",
        in_progress=Reason.UPLOAD_IN_PROGRESS,
        too_large=Reason.UPLOAD_TOO_LARGE,
        items="events",
        claim=_CLAIM,
        stored=_STORED,
        create_staging=_CREATE_STAGING,
        staging=_STAGING_TABLE,
        columns=_COLUMNS,
        rows=_event_rows,
        move=_MOVE,
        response=event_service_pb2.UploadEventsResponse,
        explain=_explain,
    )
)


async def upload_events(
    db: Database,
    slots: StreamSlots,
    timeouts: StreamTimeouts,
    requests: AsyncIterator[event_service_pb2.UploadEventsRequest],
    context: grpc.aio.ServicerContext,
    *,
    max_events: int,
    on_commit: Callable[[], None],
) -> event_service_pb2.UploadEventsResponse:
    return await run_load(
        _UPLOAD, db, slots, timeouts, requests, context, on_commit=on_commit, max_rows=max_events
    )
