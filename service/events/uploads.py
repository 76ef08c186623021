"""UploadEvents: a client stream of events loaded through COPY, all or nothing.

One transaction per upload: claim the upload_id in `uploads`, COPY the
events straight from the request stream, record the response in the claim,
commit. A bad event, a cancel, the deadline or a broken stream aborts the
COPY, and the rollback takes the claim with it: nothing of the upload is
visible, and the upload_id is free for a retry.

Idempotency. The claim is an INSERT ... ON CONFLICT DO NOTHING on the
uploads primary key. A second upload with the same id waits on that index
until the first one ends: if it committed, the second returns the stored
response without reading its own stream; if it rolled back, the second
loads its events. So two uploads with one upload_id never both commit, and
concurrent callers get the same response. (A wait longer than the statement
timeout ends in ABORTED with RetryInfo.)

Validation. PostgreSQL checks the rows as they stream through COPY, in C:
text columns refuse NUL bytes, jsonb refuses bad JSON and \\u0000, and CHECK
constraints (0001, 0003) enforce the object payload, the required fields
and the length limits. Its error names the COPY row ("COPY events, line 5,
column payload") and the column or constraint, which `_explain`
maps back to `messages[i].events[j].<field>`. Python checks only what the
table cannot: the Timestamp's range, and payloads that need the slow path
(Struct payloads, missing ones, and texts of 1000 characters or more, where
PublishEvents' own checks run so that nesting depth and size limits agree
exactly; a shorter text cannot nest deeply enough for the two parsers to
disagree). The alternative, PublishEvents' checks in Python for every row
(a json.loads each), measured end to end on the 2-core development machine
(1M events with a small JSON payload, 1000 per message; client and server
in separate uvloop processes; best of 3):

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
from service.events.payload import InvalidPayload, json_object_text
from service.rpc.validation import MAX_TIMESTAMP_SECONDS, MIN_TIMESTAMP_SECONDS
from service.streams.limits import StreamSlots, StreamTimeouts
from service.streams.loads import LoadSpec, MessagePositions, run_load

_COLUMNS = ("type", "source", "subject", "time", "payload")

# json_payload texts at least this long are checked in Python first (see above).
_PYTHON_CHECKED_PAYLOAD_CHARS = 1000

# Also reads the transaction's start, now(): events without a `time` get
# it, as PublishEvents' do, computed once per upload instead of per row; and
# `ids_before`: every id this upload draws lies above it.
_CLAIM = """
INSERT INTO uploads (upload_id, event_count, first_event_id, last_event_id)
VALUES ($1, 0, 0, 0)
ON CONFLICT (upload_id) DO NOTHING
RETURNING now() AS now, coalesce(pg_sequence_last_value('events_id_seq'), 0) AS ids_before
"""

_STORED = """
SELECT event_count, first_event_id, last_event_id FROM uploads WHERE upload_id = $1
"""

# The upload's ids are all above `ids_before`; only ids concurrent writers
# drew after the claim can come first. Page through them in id order (a
# plain index range: filtering on tx_id in SQL would let the planner pick a
# sequential scan of the whole table).
_IDS_AFTER = """
SELECT id, tx_id = pg_current_xact_id() AS ours
FROM events WHERE id > $1 ORDER BY id LIMIT 1000
"""

# currval: this session's last id, drawn by the COPY's last row.
_FINISH = """
UPDATE uploads
SET event_count = $2, first_event_id = $3, last_event_id = currval('events_id_seq')
WHERE upload_id = $1
RETURNING event_count, first_event_id, last_event_id
"""

# PostgreSQL's outermost error context names the COPY row (1-based) and,
# for errors while reading a value, the column. Only the last context line
# is trusted: the JSON parser's line before it quotes the caller's payload.
_COPY_CONTEXT = re.compile(r"(?:\A|\n)COPY events, line (\d+)(?:, column (\w+))?\Z")

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
    rows: list[tuple[str, str, str, int, str]] = []
    append = rows.append
    for index, event in enumerate(events):
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
        append((event.type, event.source, event.subject, time, payload))
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


async def _finish(
    conn: asyncpg.Connection,
    upload_id: str,
    claimed: asyncpg.Record,
    count: int,
    timeout: Callable[[], float],
) -> asyncpg.Record:
    first_id = await _first_own_id(conn, claimed["ids_before"], timeout())
    return await conn.fetchrow(_FINISH, upload_id, count, first_id, timeout=timeout())


_UPLOAD: LoadSpec[event_service_pb2.UploadEventsRequest, event_service_pb2.UploadEventsResponse] = (
    LoadSpec(
        key_name="upload_id",
        in_progress=Reason.UPLOAD_IN_PROGRESS,
        too_large=Reason.UPLOAD_TOO_LARGE,
        items="events",
        claim=_CLAIM,
        stored=_STORED,
        table="events",
        columns=_COLUMNS,
        rows=_event_rows,
        finish=_finish,
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


async def _first_own_id(conn: asyncpg.Connection, after: int, timeout: float) -> int:
    """The smallest id this transaction wrote above `after` (it wrote one)."""
    while True:
        found = await conn.fetch(_IDS_AFTER, after, timeout=timeout)
        for row in found:
            if row["ours"]:
                return int(row["id"])
        after = found[-1]["id"]
