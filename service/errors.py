"""The one place where failures become gRPC statuses.

Handlers raise `ServiceError` for what they detect themselves; everything
else (asyncpg / PostgreSQL errors, timeouts, lost connections) is translated
here by SQLSTATE class, most specific first. Every status carries exactly
one google.rpc.ErrorInfo (AIP-193), plus BadRequest field violations for
invalid input and RetryInfo where a retry can succeed. Messages never
contain SQL, parameters or credentials. docs/api.md ("Error reasons") lists
every reason and when it is sent; docs/architecture.md explains the choices.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import asyncpg
import grpc
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

log = logging.getLogger(__name__)

DOMAIN = "orderstream"


class StartupError(Exception):
    """The service cannot start; the message says why and what to change."""


@dataclass(frozen=True)
class FieldViolation:
    field: str  # proto path, e.g. "items[2].quantity"
    description: str


@dataclass
class ServiceError(Exception):
    code: grpc.StatusCode
    reason: str  # UPPER_SNAKE_CASE, stable: callers may branch on it
    message: str
    violations: Sequence[FieldViolation] = ()
    retry_after: float | None = None  # seconds; set where a retry can succeed
    metadata: Mapping[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"

    def to_status(self) -> grpc.Status:
        details = [
            error_details_pb2.ErrorInfo(reason=self.reason, domain=DOMAIN, metadata=self.metadata)
        ]
        if self.violations:
            details.append(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(
                            field=v.field, description=v.description
                        )
                        for v in self.violations
                    ]
                )
            )
        if self.retry_after is not None:
            delay = duration_pb2.Duration()
            delay.FromNanoseconds(int(self.retry_after * 1e9))
            details.append(error_details_pb2.RetryInfo(retry_delay=delay))
        status = status_pb2.Status(code=self.code.value[0], message=self.message)
        for detail in details:
            status.details.add().Pack(detail)
        return rpc_status.to_status(status)


def invalid_argument(violations: Sequence[FieldViolation]) -> ServiceError:
    summary = "; ".join(f"{v.field}: {v.description}" for v in violations[:5])
    if len(violations) > 5:
        summary += f"; and {len(violations) - 5} more"
    return ServiceError(
        grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD", f"invalid request: {summary}", violations
    )


def not_found(kind: str, ident: int) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.NOT_FOUND,
        f"{kind.upper()}_NOT_FOUND",
        f"{kind} {ident} does not exist",
        metadata={"id": str(ident)},
    )


def not_implemented(method: str) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.UNIMPLEMENTED,
        "NOT_IMPLEMENTED",
        f"{method} is declared in the contract but not served yet",
    )


def deadline_exceeded() -> ServiceError:
    return ServiceError(
        grpc.StatusCode.DEADLINE_EXCEEDED,
        "DEADLINE_EXCEEDED",
        "the call's deadline expired before the database work finished",
    )


def unavailable(message: str) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.UNAVAILABLE, "DATABASE_UNAVAILABLE", message, retry_after=1.0
    )


# SQLSTATE (exact, then by two-character class) -> how to report it.
_BY_SQLSTATE: dict[str, tuple[grpc.StatusCode, str, str, float | None]] = {
    "23505": (
        grpc.StatusCode.ALREADY_EXISTS,
        "ALREADY_EXISTS",
        "the resource already exists",
        None,
    ),
    "23503": (
        grpc.StatusCode.FAILED_PRECONDITION,
        "REFERENCE_MISSING",
        "a referenced resource does not exist",
        None,
    ),
    "40001": (grpc.StatusCode.ABORTED, "SERIALIZATION_FAILURE", "concurrent update; retry", 0.05),
    "40P01": (
        grpc.StatusCode.ABORTED,
        "DEADLOCK",
        "deadlock with a concurrent update; retry",
        0.05,
    ),
    "57014": (
        grpc.StatusCode.DEADLINE_EXCEEDED,
        "DEADLINE_EXCEEDED",
        "the database statement was cancelled at the call's deadline",
        None,
    ),
    "54001": (
        grpc.StatusCode.INVALID_ARGUMENT,
        "TOO_DEEPLY_NESTED",
        "the input is nested too deeply",
        None,
    ),
    "57P01": (
        grpc.StatusCode.UNAVAILABLE,
        "DATABASE_UNAVAILABLE",
        "the database is shutting down",
        1.0,
    ),
    "57P02": (grpc.StatusCode.UNAVAILABLE, "DATABASE_UNAVAILABLE", "the database crashed", 1.0),
    "57P03": (
        grpc.StatusCode.UNAVAILABLE,
        "DATABASE_UNAVAILABLE",
        "the database is starting up",
        1.0,
    ),
    "25006": (grpc.StatusCode.UNAVAILABLE, "DATABASE_READ_ONLY", "the database is read-only", 1.0),
}
_BY_SQLSTATE_CLASS: dict[str, tuple[grpc.StatusCode, str, str, float | None]] = {
    "08": (
        grpc.StatusCode.UNAVAILABLE,
        "DATABASE_UNAVAILABLE",
        "lost the database connection",
        1.0,
    ),
    # The service's own login or database is refused: not the caller's fault.
    "28": (
        grpc.StatusCode.UNAVAILABLE,
        "DATABASE_UNAVAILABLE",
        "the database refused the service's login",
        1.0,
    ),
    "3D": (
        grpc.StatusCode.UNAVAILABLE,
        "DATABASE_UNAVAILABLE",
        "the service's database does not exist",
        1.0,
    ),
    "22": (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_DATA", "the database rejected a value", None),
    "23": (
        grpc.StatusCode.FAILED_PRECONDITION,
        "CONSTRAINT_VIOLATED",
        "the change violates a constraint",
        None,
    ),
    "53": (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "DATABASE_RESOURCES_EXHAUSTED",
        "the database is out of resources",
        1.0,
    ),
}


def from_exception(exc: BaseException, method: str) -> ServiceError:
    """Picks the most specific status for `exc`; unknown errors become INTERNAL."""
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, asyncpg.PostgresError):
        sqlstate = exc.sqlstate or ""
        entry = _BY_SQLSTATE.get(sqlstate) or _BY_SQLSTATE_CLASS.get(sqlstate[:2])
        if entry is not None:
            code, reason, message, retry_after = entry
            return ServiceError(code, reason, message, retry_after=retry_after)
    if isinstance(exc, TimeoutError):
        return deadline_exceeded()
    if isinstance(
        exc, (asyncpg.ConnectionDoesNotExistError, asyncpg.InterfaceError, ConnectionError, OSError)
    ):
        return unavailable("lost the database connection")
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
        return unavailable("lost the database connection")
    return _internal(exc, method)


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
        "INTERNAL",
        f"internal error (incident {incident})",
        metadata={"incident": incident},
    )


async def abort(context: grpc.aio.ServicerContext, error: ServiceError) -> None:
    """Ends the call with `error`; grpc.aio has no abort_with_status."""
    status = error.to_status()
    await context.abort(status.code, status.details, status.trailing_metadata)
