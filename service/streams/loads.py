"""What the client-streamed loads (UploadEvents, ImportOrders) share: the
idempotency key carried by the stream, telling a finished stream from a
dead call, a transaction that cancellation cannot leave half-done, and the
map from a COPY row back to the message that carried it."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import asyncpg
import grpc

from service.db.runner import Database
from service.errors import FieldViolation, Reason, ServiceError, invalid_argument
from service.rpc.validation import MAX_ID_LENGTH
from service.streams.limits import StreamSlots

Message = TypeVar("Message")
Response = TypeVar("Response")


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
    db: Database,
    slots: StreamSlots,
    requests: AsyncIterator[Message],
    context: grpc.aio.ServicerContext,
    *,
    key_name: str,
    load: Callable[[asyncpg.Connection, Message, str], Awaitable[tuple[Response, bool]]],
    on_commit: Callable[[], None],
) -> Response:
    """The frame of every load: a stream slot, the first message and its
    key, one connection and one all-or-nothing transaction around `load`
    (which returns the response and whether it wrote rows), and
    `on_commit` once rows are committed."""
    with slots.hold():
        # Read before taking a connection: a client slow to start holds none.
        first = await first_message(requests, context, key_name)
        key = getattr(first, key_name)
        check_key(key, f"messages[0].{key_name}")
        conn = await db.acquire(context)
        try:
            async with all_or_nothing(conn):
                response, wrote = await load(conn, first, key)
        finally:
            await db.release(conn)
    if wrote:
        on_commit()
    return response


async def claim_key(
    conn: asyncpg.Connection,
    db: Database,
    context: grpc.aio.ServicerContext,
    *,
    claim: str,
    stored: str,
    key_name: str,
    key: str,
) -> tuple[asyncpg.Record | None, asyncpg.Record | None]:
    """Claims `key` in this transaction with the statement `claim` (an
    INSERT ... ON CONFLICT DO NOTHING ... RETURNING): (its row, None). If a
    load with `key` committed first: (None, its row read by `stored`). A
    load with `key` that is still running when our timeout ends is ABORTED
    with RetryInfo."""
    in_progress = _IN_PROGRESS[key_name]  # first, so that a new kind of load fails at once
    try:
        claimed = await conn.fetchrow(claim, key, timeout=db.query_timeout(context))
    except TimeoutError:
        raise _load_in_progress(in_progress, key_name, key) from None
    if claimed is not None:
        return claimed, None
    committed = await conn.fetchrow(stored, key, timeout=db.query_timeout(context))
    if committed is None:  # unreachable unless rows of the key's table are deleted
        raise _load_in_progress(in_progress, key_name, key)
    return None, committed


def check_key(key: str, field: str) -> None:
    """The first message's idempotency key: 1..128 characters, no NUL."""
    if not key:
        raise invalid_argument([FieldViolation(field, "required in the first message")])
    if len(key) > MAX_ID_LENGTH or "\x00" in key:
        raise invalid_argument(
            [FieldViolation(field, f"1 to {MAX_ID_LENGTH} characters without NUL")]
        )


# Each load's key, and the reason sent while another load with it still runs.
_IN_PROGRESS = {"upload_id": Reason.UPLOAD_IN_PROGRESS, "import_id": Reason.IMPORT_IN_PROGRESS}


def _load_in_progress(reason: Reason, key_name: str, key: str) -> ServiceError:
    """A load with the same key is still running (we outwaited our timeout)."""
    kind = key_name.removesuffix("_id")  # "upload", "import"
    return ServiceError(
        grpc.StatusCode.ABORTED,
        reason,
        f"another {kind} with this {key_name} is still running; retry to get its result",
        retry_after=1.0,
        metadata={key_name: key},
    )


def key_mismatch(field: str) -> ServiceError:
    return invalid_argument(
        [FieldViolation(field, "must be empty or the same as in the first message")]
    )


async def first_message(
    requests: AsyncIterator[Message], context: grpc.aio.ServicerContext, key_name: str
) -> Message:
    """Waits for the stream's first message; an empty stream is invalid."""
    message = await anext(requests, None)
    if message is None:
        await confirm_end(context)
        raise invalid_argument(
            [FieldViolation("messages", f"at least one message, carrying {key_name}, is required")]
        )
    return message


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
    load rolls back, and `boundary.rpc` ends the call as the cancellation it is.
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
