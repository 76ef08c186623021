"""How a handler's exception becomes a status; used by `rpc`
(service/rpc/boundary.py) and the auth interceptor only.

`ServiceError` is reported as it is; the database layer's own exceptions
(service/db/failures.py) by what they say; asyncpg / PostgreSQL errors by
SQLSTATE, exact code first, then its two-character class, following the
table in DESIGN.md; then timeouts and lost connections. Anything else is a
bug: INTERNAL with an incident id, the traceback only in the log.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

import asyncpg
import grpc

from service.db.failures import CallDeadlineReached, DatabaseNotAnswering, PoolExhausted
from service.errors import Reason, ServiceError

log = logging.getLogger(__name__)

_Entry = tuple[grpc.StatusCode, Reason, str, float | None]

# SQLSTATE (exact, then by two-character class) -> how to report it.
_BY_SQLSTATE: dict[str, _Entry] = {
    "23505": (
        grpc.StatusCode.ALREADY_EXISTS,
        Reason.ALREADY_EXISTS,
        "the resource already exists",
        None,
    ),
    "23503": (
        grpc.StatusCode.FAILED_PRECONDITION,
        Reason.REFERENCE_MISSING,
        "a referenced resource does not exist",
        None,
    ),
    "40001": (
        grpc.StatusCode.ABORTED,
        Reason.SERIALIZATION_FAILURE,
        "concurrent update; retry",
        0.05,
    ),
    "40P01": (
        grpc.StatusCode.ABORTED,
        Reason.DEADLOCK,
        "deadlock with a concurrent update; retry",
        0.05,
    ),
    "57014": (
        grpc.StatusCode.DEADLINE_EXCEEDED,
        Reason.DEADLINE_EXCEEDED,
        "the database statement was cancelled at the call's deadline",
        None,
    ),
    "54001": (
        grpc.StatusCode.INVALID_ARGUMENT,
        Reason.TOO_DEEPLY_NESTED,
        "the input is nested too deeply",
        None,
    ),
    "57P01": (
        grpc.StatusCode.UNAVAILABLE,
        Reason.DATABASE_UNAVAILABLE,
        "the database is shutting down",
        1.0,
    ),
    "57P02": (
        grpc.StatusCode.UNAVAILABLE,
        Reason.DATABASE_UNAVAILABLE,
        "the database crashed",
        1.0,
    ),
    "57P03": (
        grpc.StatusCode.UNAVAILABLE,
        Reason.DATABASE_UNAVAILABLE,
        "the database is starting up",
        1.0,
    ),
    "25006": (
        grpc.StatusCode.UNAVAILABLE,
        Reason.DATABASE_READ_ONLY,
        "the database is read-only",
        1.0,
    ),
}
_BY_SQLSTATE_CLASS: dict[str, _Entry] = {
    "08": (
        grpc.StatusCode.UNAVAILABLE,
        Reason.DATABASE_UNAVAILABLE,
        "lost the database connection",
        1.0,
    ),
    # The service's own login or database is refused: not the caller's fault.
    "28": (
        grpc.StatusCode.UNAVAILABLE,
        Reason.DATABASE_UNAVAILABLE,
        "the database refused the service's login",
        1.0,
    ),
    "3D": (
        grpc.StatusCode.UNAVAILABLE,
        Reason.DATABASE_UNAVAILABLE,
        "the service's database does not exist",
        1.0,
    ),
    "22": (
        grpc.StatusCode.INVALID_ARGUMENT,
        Reason.INVALID_DATA,
        "the database rejected a value",
        None,
    ),
    "23": (
        grpc.StatusCode.FAILED_PRECONDITION,
        Reason.CONSTRAINT_VIOLATED,
        "the change violates a constraint",
        None,
    ),
    "53": (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        Reason.DATABASE_RESOURCES_EXHAUSTED,
        "the database is out of resources",
        1.0,
    ),
}


def from_exception(exc: BaseException, method: str) -> ServiceError:
    """Picks the most specific status for `exc`; unknown errors become INTERNAL."""
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, PoolExhausted):
        # The pool is busy, not broken: retry once a connection may be free.
        return ServiceError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            Reason.POOL_EXHAUSTED,
            str(exc),
            retry_after=exc.timeout,
        )
    if isinstance(exc, DatabaseNotAnswering):
        return _unavailable(str(exc))
    if isinstance(exc, (CallDeadlineReached, TimeoutError)):
        # TimeoutError: asyncpg's statement timeout, the remaining deadline
        # or the command timeout, whichever was shorter.
        return _deadline_exceeded()
    if isinstance(exc, asyncpg.PostgresError):
        refusal = from_sqlstate(exc.sqlstate or "")
        if refusal is not None:
            return refusal
    if isinstance(exc, asyncpg.TargetServerAttributeNotMatched):
        # Every host answered, none as a writable primary: a failover whose
        # promotion has not finished, or an address still on the old node.
        return ServiceError(
            grpc.StatusCode.UNAVAILABLE,
            Reason.DATABASE_READ_ONLY,
            "no database server that takes writes is reachable",
            retry_after=1.0,
        )
    if isinstance(
        exc, (asyncpg.ConnectionDoesNotExistError, asyncpg.InterfaceError, ConnectionError, OSError)
    ):
        return _unavailable("lost the database connection")
    if isinstance(exc, asyncpg.InternalClientError):
        # asyncpg lost track of its connection's protocol state. Seen in the
        # fault soak when the server ends a connection between two statements
        # (pg_terminate_backend, a crash): asyncpg reads the FATAL message
        # while idle, is left "in progress", and refuses the next statement
        # before sending it ("cannot switch to state 12; another operation
        # (2) is in progress"). Nothing was sent, so retrying is safe. Logged
        # in full, so a real asyncpg bug still shows.
        log.warning(
            "database connection in a broken state",
            exc_info=exc,
            extra={"method": method},
        )
        return _unavailable("lost the database connection")
    return _internal(exc, method)


def from_sqlstate(sqlstate: str) -> ServiceError | None:
    """The status for a database error known only by its SQLSTATE (as a
    batch reports one of its orders: service/orders/create_batches.py);
    None when the table above does not name it."""
    entry = _BY_SQLSTATE.get(sqlstate) or _BY_SQLSTATE_CLASS.get(sqlstate[:2])
    if entry is None:
        return None
    code, reason, message, retry_after = entry
    return ServiceError(code, reason, message, retry_after=retry_after)


def _deadline_exceeded() -> ServiceError:
    return ServiceError(
        grpc.StatusCode.DEADLINE_EXCEEDED,
        Reason.DEADLINE_EXCEEDED,
        "the call's deadline expired before the database work finished",
    )


def _unavailable(message: str) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.UNAVAILABLE, Reason.DATABASE_UNAVAILABLE, message, retry_after=1.0
    )


def _internal(exc: BaseException, method: str) -> ServiceError:
    incident = uuid.uuid4().hex[:16]
    # The traceback goes to the log only; the caller gets an id to quote.
    log.error(
        "internal error",
        exc_info=exc,
        extra={"method": method, "incident": incident},
    )
    return ServiceError(
        grpc.StatusCode.INTERNAL,
        Reason.INTERNAL,
        f"internal error (incident {incident})",
        metadata={"incident": incident},
    )


async def abort(context: grpc.aio.ServicerContext, error: ServiceError) -> None:
    """Ends the call with `error`; grpc.aio has no abort_with_status.

    The status travels after the messages already written, so `abort`
    returns only once the reader has taken them. For a reader that stopped
    (`error.status_wait` set) the handler waits that long at most, then
    ends as cancelled: the status stays queued in gRPC behind the messages,
    so a reader that reads on still receives them and then this status
    (measured with grpcio 1.85), and a dead connection ends it all.
    """
    status = error.to_status()
    if error.status_wait is None:
        await context.abort(status.code, status.details, status.trailing_metadata)
        return
    try:
        async with asyncio.timeout(error.status_wait):
            await context.abort(status.code, status.details, status.trailing_metadata)
    except TimeoutError:
        # CancelledError is the one exception grpc.aio takes quietly from a
        # handler whose status is already on its way.
        raise asyncio.CancelledError("the status waits for the reader") from None
