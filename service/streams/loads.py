"""The frame of the client-streamed loads (UploadEvents, ImportOrders): one
request stream, read here from its first message to its confirmed end, COPYed
into a temporary staging table and moved into the real tables by one
statement, all or nothing under the idempotency key the stream carries.

Staging keeps the writes to the real tables short and paced by the server,
not by the client: the event feed's writer lock (migrations 0002, 0004) is
taken only by the move, at the end, so a client that streams slowly or
stalls holds no reader of the feed back.

What a load does on its own, a `LoadSpec` names: its SQL (the claim, the
stored response, the staging table, the move), how one message's items
become rows, and its explanation of a PostgreSQL error. The rest is the
frame's, in `run_load`: a stream slot, the key (required in the first
message, the same or empty in every later one), a caller that goes quiet
(no first message, or none for a while after), telling a finished stream
from a dead call, one connection and a transaction that cancellation
cannot leave half-done, the claim of the key, the staging table, the COPY,
the map from a COPY row back to the message that carried it, the empty
load, the move, and `on_commit` once rows are committed; and a retry of a
key whose load committed, answered with the stored response once its own
stream has been read (and dropped) to its end.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import enum
import functools
import math
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import asyncpg
import grpc
from google.protobuf.message import Message as ProtoMessage

from service.db.runner import Database
from service.errors import FieldViolation, Reason, ServiceError, invalid_argument
from service.rpc.validation import MAX_ID_LENGTH
from service.streams.limits import StreamSlots, StreamTimeouts

Request = TypeVar("Request", bound=ProtoMessage)
Response = TypeVar("Response", bound=ProtoMessage)

Row = tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class LoadSpec(Generic[Request, Response]):
    """What one client-streamed load is made of; `run_load` does the rest.

    `rows` turns one message's items into COPY rows (a whole message per
    call, so the frame's own work is per message, not per row), raising a
    ServiceError that names `messages[i].<items>[j]...` for a bad item. The
    row `claim` returned is `claimed`.
    """

    key_name: str  # the request field with the idempotency key: "upload_id"
    # Sent when a load with the same key is still running: UPLOAD_IN_PROGRESS.
    in_progress: Reason
    items: str  # the repeated request field loaded as rows: "events"
    # INSERT ... ON CONFLICT DO NOTHING ... RETURNING: claims the key ($1).
    claim: str
    # The committed load's response columns, by key ($1).
    stored: str
    # CREATE TEMP TABLE <staging> ... ON COMMIT DROP, and its name: the COPY's
    # target, in pg_temp.
    create_staging: str
    staging: str
    columns: tuple[str, ...]
    rows: Callable[[Any, int, asyncpg.Record], Sequence[Row]]  # (items, message index, claimed)
    # Once rows were copied: one statement that moves them out of the staging
    # table and returns the response columns (as `stored` has them), by key ($1).
    move: str
    response: type[Response]
    # Sent when a load holds more rows than `run_load`'s max_rows.
    too_large: Reason | None = None
    # The item behind a PostgreSQL error during the COPY, if it is about one
    # item's data (None: the error goes on to service/rpc/status_map.py).
    explain: Callable[[asyncpg.PostgresError, MessagePositions], ServiceError | None] | None = None


class RejectedRow(Exception):
    """Raised inside a COPY's record generator once the load has found a
    problem (kept in `LoadState.error`).

    Deliberately without a message, so that nothing long travels with it:
    COPY hangs when the generator's exception message is about 10 KB or
    longer (asyncpg #1354). The handler builds the status outside the COPY.
    """


class LoadState:
    """What a record generator found, read by the handler once COPY returns."""

    __slots__ = ("error",)

    def __init__(self) -> None:
        self.error: ServiceError | None = None

    def reject(self, error: ServiceError) -> RejectedRow:
        """Remembers `error`; the caller raises what this returns."""
        self.error = error
        return RejectedRow()


async def run_load(
    spec: LoadSpec[Request, Response],
    db: Database,
    slots: StreamSlots,
    timeouts: StreamTimeouts,
    requests: AsyncIterator[Request],
    context: grpc.aio.ServicerContext,
    *,
    on_commit: Callable[[], None],
    max_rows: int | None = None,
) -> Response:
    """Loads the request stream as `spec` says: a stream slot, the first
    message and its key, one connection and one all-or-nothing transaction
    around the load, and `on_commit` once rows are committed. More than
    `max_rows` rows in all is RESOURCE_EXHAUSTED; a caller quiet for longer
    than `timeouts` allow is CLIENT_STREAM_IDLE."""
    with slots.hold():
        # Read before taking a connection: a client slow to start holds none,
        # and one that never starts gives its slot back after the timeout.
        first = await first_message(
            requests, context, spec.key_name, timeout=timeouts.first_message
        )
        key = getattr(first, spec.key_name)
        check_key(key, f"messages[0].{spec.key_name}")
        async with db.connection(context) as conn, all_or_nothing(conn):
            response, outcome = await _load(
                spec, conn, db, context, first, requests, key, max_rows, timeouts.client_idle
            )
        if outcome is _Outcome.STORED:
            # Without a connection: the caller may still be sending.
            await _discard_rest(spec, first, requests, context, key, max_rows, timeouts.client_idle)
    if outcome is _Outcome.WROTE:
        on_commit()
    return response


class _Outcome(enum.Enum):
    """What `_load` did: wrote rows, wrote none, or found the key's load
    already committed (its stored response is the answer)."""

    WROTE = enum.auto()
    EMPTY = enum.auto()
    STORED = enum.auto()


async def _load(
    spec: LoadSpec[Request, Response],
    conn: asyncpg.Connection,
    db: Database,
    context: grpc.aio.ServicerContext,
    first: Request,
    rest: AsyncIterator[Request],
    key: str,
    max_rows: int | None,
    idle_timeout: float,
) -> tuple[Response, _Outcome]:
    """Runs inside the load's transaction; returns the response and what
    the load did. A key already committed is answered from its stored
    response, without reading the rest of the stream."""
    timeout = functools.partial(db.query_timeout, context)
    fresh, claimed = await claim_key(conn, spec, key, timeout)
    if not fresh:
        return spec.response(**claimed), _Outcome.STORED

    await conn.execute(spec.create_staging, timeout=timeout())
    positions = MessagePositions()
    state = LoadState()
    records = _records(
        spec, first, rest, context, key, claimed, max_rows, positions, state, idle_timeout
    )
    try:
        async with contextlib.aclosing(records):
            await conn.copy_records_to_table(
                spec.staging,
                schema_name="pg_temp",
                columns=spec.columns,
                records=records,
                timeout=NO_STATEMENT_TIMEOUT,
            )
    except RejectedRow:
        assert state.error is not None
        raise state.error from None
    except asyncpg.PostgresError as exc:
        error = None if spec.explain is None else spec.explain(exc, positions)
        if error is None:
            raise
        raise error from None
    if positions.rows == 0:
        return spec.response(), _Outcome.EMPTY
    # Bulk work that grows with the stream, bounded like the COPY.
    moved = await conn.fetchrow(spec.move, key, timeout=NO_STATEMENT_TIMEOUT)
    return spec.response(**moved), _Outcome.WROTE


async def _records(
    spec: LoadSpec[Request, Response],
    first: Request,
    rest: AsyncIterator[Request],
    context: grpc.aio.ServicerContext,
    key: str,
    claimed: asyncpg.Record,
    max_rows: int | None,
    positions: MessagePositions,
    state: LoadState,
    idle_timeout: float,
) -> AsyncGenerator[Row]:
    """The rows of the whole request stream, read message by message; a
    problem found here is kept in `state` and raised as RejectedRow. No
    next message within `idle_timeout` is such a problem: the COPY waits on
    the caller meanwhile, holding a connection and a transaction."""
    key_name = spec.key_name
    items = spec.items
    rows_of = spec.rows
    request: Request | None = first
    while request is not None:
        message = positions.messages
        if (other := getattr(request, key_name)) and other != key:
            raise state.reject(key_mismatch(f"messages[{message}].{key_name}"))
        batch = getattr(request, items)
        if max_rows is not None and positions.rows + len(batch) > max_rows:
            raise state.reject(_too_large(spec, max_rows))
        try:
            rows = rows_of(batch, message, claimed)
        except ServiceError as error:
            raise state.reject(error) from None
        positions.add(len(rows))
        for row in rows:
            yield row
        try:
            async with asyncio.timeout(idle_timeout):
                request = await anext(rest, None)
        except TimeoutError:
            raise state.reject(
                client_stream_idle(positions.messages, idle_timeout, first=False)
            ) from None
    await confirm_end(context)


async def _discard_rest(
    spec: LoadSpec[Request, Any],
    first: Request,
    rest: AsyncIterator[Request],
    context: grpc.aio.ServicerContext,
    key: str,
    max_rows: int | None,
    idle_timeout: float,
) -> None:
    """Reads and drops the rest of a retried load's stream, whose answer is
    the stored response, then confirms its end.

    Answering at once would close the call while the caller is still
    sending: a client that writes its whole stream before it reads (buf curl
    does) then fails with its write cut off instead of getting the result.
    The stream is held to the same bounds as a load's (the key, `max_rows`,
    the idle timeout; the message size is the deserializer's), so a retry
    cannot keep its slot longer than a load could.
    """
    key_name = spec.key_name
    rows = len(getattr(first, spec.items))
    message = 1
    while True:
        if max_rows is not None and rows > max_rows:
            raise _too_large(spec, max_rows)
        try:
            async with asyncio.timeout(idle_timeout):
                request = await anext(rest, None)
        except TimeoutError:
            raise client_stream_idle(message, idle_timeout, first=False) from None
        if request is None:
            break
        if (other := getattr(request, key_name)) and other != key:
            raise key_mismatch(f"messages[{message}].{key_name}")
        rows += len(getattr(request, spec.items))
        message += 1
    await confirm_end(context)


async def claim_key(
    conn: asyncpg.Connection, spec: LoadSpec[Any, Any], key: str, timeout: Callable[[], float]
) -> tuple[bool, asyncpg.Record]:
    """Claims `key` in this transaction with `spec.claim`: (True, its row).
    If a load with `key` committed first: (False, its row read by
    `spec.stored`). A load with `key` that is still running when our
    timeout ends is ABORTED with RetryInfo."""
    try:
        claimed = await conn.fetchrow(spec.claim, key, timeout=timeout())
    except TimeoutError:
        raise _load_in_progress(spec, key) from None
    if claimed is not None:
        return True, claimed
    committed = await conn.fetchrow(spec.stored, key, timeout=timeout())
    if committed is None:  # unreachable unless rows of the key's table are deleted
        raise _load_in_progress(spec, key)
    return False, committed


def check_key(key: str, field: str) -> None:
    """The first message's idempotency key: 1..128 characters, no NUL."""
    if not key:
        raise invalid_argument([FieldViolation(field, "required in the first message")])
    if len(key) > MAX_ID_LENGTH or "\x00" in key:
        raise invalid_argument(
            [FieldViolation(field, f"1 to {MAX_ID_LENGTH} characters without NUL")]
        )


def _load_in_progress(spec: LoadSpec[Any, Any], key: str) -> ServiceError:
    """A load with the same key is still running (we outwaited our timeout)."""
    kind = spec.key_name.removesuffix("_id")  # "upload", "import"
    return ServiceError(
        grpc.StatusCode.ABORTED,
        spec.in_progress,
        f"another {kind} with this {spec.key_name} is still running; retry to get its result",
        retry_after=1.0,
        metadata={spec.key_name: key},
    )


def _too_large(spec: LoadSpec[Any, Any], max_rows: int) -> ServiceError:
    kind = spec.key_name.removesuffix("_id")
    assert spec.too_large is not None, "a load with max_rows names its too_large reason"
    return ServiceError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        spec.too_large,
        f"an {kind} may hold at most {max_rows} {spec.items}; split it into several {kind}s",
        metadata={f"max_{spec.items}": str(max_rows)},
    )


def key_mismatch(field: str) -> ServiceError:
    return invalid_argument(
        [FieldViolation(field, "must be empty or the same as in the first message")]
    )


async def first_message(
    requests: AsyncIterator[Request],
    context: grpc.aio.ServicerContext,
    key_name: str,
    *,
    timeout: float,
) -> Request:
    """Waits up to `timeout` for the stream's first message; an empty
    stream is invalid."""
    try:
        async with asyncio.timeout(timeout):
            message = await anext(requests, None)
    except TimeoutError:
        raise client_stream_idle(0, timeout, first=True) from None
    if message is None:
        await confirm_end(context)
        raise invalid_argument(
            [FieldViolation("messages", f"at least one message, carrying {key_name}, is required")]
        )
    return message


def client_stream_idle(index: int, timeout: float, *, first: bool) -> ServiceError:
    """The caller sent no message `index` within `timeout`.

    DEADLINE_EXCEEDED: a time limit ended the call before it could complete,
    as the caller's own deadline would; the reason tells it was the server's
    limit on a quiet caller, not the call's deadline. Not UNAVAILABLE, which
    says the server failed and invites automatic retries of a stream the
    client may not be able to replay; not ABORTED, which is about concurrency.
    Nothing was committed, so a retry with the same key is safe.
    """
    if first:
        what = f"no first message within {timeout:g} s (ORDERSTREAM_FIRST_MESSAGE_TIMEOUT)"
    else:
        what = (
            f"no message {index} within {timeout:g} s of the one before "
            "(ORDERSTREAM_CLIENT_IDLE_TIMEOUT)"
        )
    return ServiceError(
        grpc.StatusCode.DEADLINE_EXCEEDED,
        Reason.CLIENT_STREAM_IDLE,
        f"the client stream went quiet: {what}; nothing was loaded",
        metadata={"message_index": str(index), "timeout_seconds": f"{timeout:g}"},
    )


# asyncpg's timeout for the COPY (and the bulk statements after it): none.
# timeout=None would mean the command timeout, which bounds single
# statements, while a COPY lasts as long as the client keeps streaming (10M
# events take about a minute). The call's deadline still bounds it: gRPC
# cancels the handler when the deadline passes, and asyncpg cancels the
# running statement with it. One mechanism, so the two cannot race.
NO_STATEMENT_TIMEOUT = math.inf


async def confirm_end(context: grpc.aio.ServicerContext) -> None:
    """Returns if the client really ended its request stream; raises if the
    call is gone.

    grpc.aio ends the request iterator in the same way whether the client
    half-closed or the call died (client cancel, deadline, broken
    connection): a failed receive reads as end of stream, and the handler is
    cancelled separately, possibly only after a commit. Only a real end may
    commit a load, so this sends the response headers now, which fails on a
    dead call (with grpc.aio.InternalError, as seen with grpcio 1.85): the
    load rolls back, and `call.rpc` ends the call as the cancellation it is.
    """
    await context.send_initial_metadata(())


@contextlib.asynccontextmanager
async def all_or_nothing(conn: asyncpg.Connection) -> AsyncIterator[None]:
    """A transaction that commits if the body returns and rolls back if it
    raises, and finishes either even if the call is cancelled meanwhile.

    A load is often cancelled twice: once when its stream turns out broken,
    again when gRPC cancels the handler. An interrupted ROLLBACK would leave
    the connection for the pool to reset; an interrupted COMMIT would leave
    its outcome unknown. A cancellation that arrives while either runs is
    raised once it is done.
    """
    transaction = conn.transaction()
    await transaction.start()
    try:
        yield
    except BaseException:
        # The body's error is the one to report; a connection too broken to
        # roll back is closed by the pool.
        with contextlib.suppress(Exception):
            await _to_the_end(transaction.rollback())
        raise
    await _to_the_end(transaction.commit())


async def _to_the_end(operation: Awaitable[None]) -> None:
    """Awaits `operation` to its end however often this task is cancelled
    meanwhile (asyncio.wait, unlike wait_for, leaves it running); then
    raises the cancellation, or the operation's error. asyncpg bounds the
    operation itself by the command timeout."""
    task = asyncio.ensure_future(operation)
    cancelled = False
    while not task.done():
        try:
            await asyncio.wait([task])
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    task.result()


class MessagePositions:
    """Maps a row's position in a COPY back to (message index, index within
    the message), for error reports such as `messages[3].events[17].type`.

    Memory does not grow with the rows: consecutive messages of one size
    share a single entry, so a stream of equal batches costs one entry.
    """

    __slots__ = ("_counts", "_first_messages", "_first_rows", "_sizes", "messages", "rows")

    def __init__(self) -> None:
        self._first_rows: list[int] = []  # row where each run starts
        self._first_messages: list[int] = []  # message index where it starts
        self._sizes: list[int] = []  # rows per message within the run
        self._counts: list[int] = []  # messages in the run
        self.messages = 0
        self.rows = 0

    def add(self, size: int) -> None:
        """Records the next message, holding `size` rows."""
        if size:
            sizes = self._sizes
            if (
                sizes
                and sizes[-1] == size
                and self._first_messages[-1] + self._counts[-1] == self.messages
            ):
                self._counts[-1] += 1
            else:
                self._first_rows.append(self.rows)
                self._first_messages.append(self.messages)
                sizes.append(size)
                self._counts.append(1)
        self.rows += size
        self.messages += 1

    def locate(self, row: int) -> tuple[int, int]:
        """(message, index) of the zero-based `row`, which must have been added."""
        if not 0 <= row < self.rows:
            raise IndexError(f"row {row} is not among the {self.rows} rows added")
        run = bisect.bisect_right(self._first_rows, row) - 1
        offset = row - self._first_rows[run]
        size = self._sizes[run]
        return self._first_messages[run] + offset // size, offset % size
