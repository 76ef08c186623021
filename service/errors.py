"""What every layer may raise: `ServiceError` and the one catalogue of the
reasons it carries.

Handlers and the layers they call raise `ServiceError` for what they detect
themselves. Everything else (the database layer's own exceptions,
asyncpg / PostgreSQL errors, timeouts, lost connections) becomes a status
in service/rpc/status_map.py, the one place that translates. Every status
carries exactly one google.rpc.ErrorInfo (AIP-193) whose reason is a member
of `Reason`, plus BadRequest field violations for invalid input and
RetryInfo where a retry can succeed. Messages never contain SQL, parameters
or credentials. docs/api.md lists every reason (tests/test_error_catalogue.py
keeps the two equal).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import grpc
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

DOMAIN = "orderstream"


class Reason(enum.StrEnum):
    """Every ErrorInfo.reason the service sends. The values are the wire
    strings: stable, callers may branch on them."""

    # INVALID_ARGUMENT
    INVALID_FIELD = "INVALID_FIELD"  # a request field is invalid; BadRequest names each one
    INVALID_DATA = "INVALID_DATA"  # PostgreSQL rejected a value (SQLSTATE class 22)
    TOO_DEEPLY_NESTED = "TOO_DEEPLY_NESTED"  # PostgreSQL found the input nested too deeply (54001)
    # RESOURCE_EXHAUSTED
    MESSAGE_TOO_LARGE = "MESSAGE_TOO_LARGE"  # a request message over ORDERSTREAM_MAX_MESSAGE_BYTES
    POOL_EXHAUSTED = "POOL_EXHAUSTED"  # no pooled connection became free within the acquire timeout
    TOO_MANY_STREAMS = "TOO_MANY_STREAMS"  # all stream slots of this server are busy
    TOO_MANY_HEALTH_WATCHES = "TOO_MANY_HEALTH_WATCHES"  # ORDERSTREAM_MAX_HEALTH_WATCHES are open
    TOO_MANY_RPCS = "TOO_MANY_RPCS"  # ORDERSTREAM_MAX_CONCURRENT_RPCS calls are in progress
    UPLOAD_TOO_LARGE = "UPLOAD_TOO_LARGE"  # an upload over ORDERSTREAM_MAX_UPLOAD_EVENTS
    DATABASE_RESOURCES_EXHAUSTED = "DATABASE_RESOURCES_EXHAUSTED"  # SQLSTATE class 53
    # NOT_FOUND
    ORDER_NOT_FOUND = "ORDER_NOT_FOUND"  # GetOrder / UpdateOrderStatus of an id that does not exist
    EVENT_NOT_FOUND = "EVENT_NOT_FOUND"  # GetEvent of an id that does not exist
    CONSUMER_NOT_FOUND = "CONSUMER_NOT_FOUND"  # a durable consumer no stream has created
    # ALREADY_EXISTS
    ALREADY_EXISTS = "ALREADY_EXISTS"  # a unique constraint refused the row (23505)
    REQUEST_ID_REUSED = "REQUEST_ID_REUSED"  # a write's request_id came with another body
    # FAILED_PRECONDITION
    ILLEGAL_TRANSITION = "ILLEGAL_TRANSITION"  # the order's status may not move to the one asked
    REFERENCE_MISSING = "REFERENCE_MISSING"  # a foreign key found no row (23503)
    CONSTRAINT_VIOLATED = "CONSTRAINT_VIOLATED"  # any other integrity constraint (class 23)
    # OUT_OF_RANGE
    ACK_PAST_DELIVERED = "ACK_PAST_DELIVERED"  # AckEvents past what the consumer was sent
    POSITION_NOT_FINAL = "POSITION_NOT_FINAL"  # ResetConsumer at or past the safe horizon
    EVENTS_EXPIRED = "EVENTS_EXPIRED"  # StreamEvents after a position retention deleted past
    # ABORTED: retry
    VERSION_MISMATCH = "VERSION_MISMATCH"  # UpdateOrderStatus's expected_version is not current
    SERIALIZATION_FAILURE = "SERIALIZATION_FAILURE"  # 40001, also a standby's replication conflict
    DEADLOCK = "DEADLOCK"  # 40P01
    CONCURRENT_REQUEST = "CONCURRENT_REQUEST"  # a request_id's record vanished meanwhile
    CONCURRENT_UPDATE = "CONCURRENT_UPDATE"  # the order changed between UpdateOrderStatus's steps
    UPLOAD_IN_PROGRESS = "UPLOAD_IN_PROGRESS"  # an UploadEvents with this upload_id still runs
    IMPORT_IN_PROGRESS = "IMPORT_IN_PROGRESS"  # an ImportOrders with this import_id still runs
    # DEADLINE_EXCEEDED
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"  # the deadline ended the database work (or 57014)
    # A client stream's caller sent no message within the first-message or
    # idle timeout (service/streams/loads.py)
    CLIENT_STREAM_IDLE = "CLIENT_STREAM_IDLE"
    # UNAVAILABLE: retry
    DATABASE_UNAVAILABLE = "DATABASE_UNAVAILABLE"  # no connection, a lost one, a database down
    # the database is read-only (25006), or no host of DATABASE_URL was writable
    DATABASE_READ_ONLY = "DATABASE_READ_ONLY"
    SHUTTING_DOWN = "SHUTTING_DOWN"  # StreamEvents ended by the server's shutdown; resume
    READER_STALLED = "READER_STALLED"  # a server stream's reader took no message in time; resume
    # UNAUTHENTICATED
    TOKEN_MISSING = "TOKEN_MISSING"  # no authorization metadata
    TOKEN_MALFORMED = "TOKEN_MALFORMED"  # authorization metadata not one `Bearer <token>`
    TOKEN_UNKNOWN = "TOKEN_UNKNOWN"  # a token that is not in the tokens file
    # no token, and a client certificate that is not in the identities file
    CERTIFICATE_UNKNOWN = "CERTIFICATE_UNKNOWN"
    # PERMISSION_DENIED
    SCOPE_MISSING = "SCOPE_MISSING"  # the token lacks the scope the method needs
    METHOD_NOT_ALLOWED = "METHOD_NOT_ALLOWED"  # a method with no scope in METHOD_SCOPES
    RESERVED_EVENT_TYPE = "RESERVED_EVENT_TYPE"  # order.*: the service's own event types
    RESERVED_EVENT_SOURCE = "RESERVED_EVENT_SOURCE"  # the source of the service's own events
    EVENT_TYPE_NOT_GRANTED = "EVENT_TYPE_NOT_GRANTED"  # a type outside the caller's types= limit
    EVENT_SOURCE_NOT_GRANTED = "EVENT_SOURCE_NOT_GRANTED"  # a source outside its sources= limit
    # INTERNAL
    INTERNAL = "INTERNAL"  # a bug; the message and metadata carry an incident id for the log


class StartupError(Exception):
    """The service cannot start; the message says why and what to change."""


@dataclass(frozen=True)
class FieldViolation:
    field: str  # proto path, e.g. "items[2].quantity"
    description: str


@dataclass
class ServiceError(Exception):
    code: grpc.StatusCode
    reason: Reason
    message: str
    violations: Sequence[FieldViolation] = ()
    retry_after: float | None = None  # seconds; set where a retry can succeed
    metadata: Mapping[str, str] = field(default_factory=dict)
    # Set on a server stream's error raised while the reader has messages
    # it has not taken: the status is sent after them, so it waits for the
    # reader; this bounds how long the handler waits with it (see `abort`
    # in service/rpc/status_map.py).
    status_wait: float | None = None

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"

    def to_status(self) -> grpc.Status:
        details = [
            error_details_pb2.ErrorInfo(
                reason=self.reason.value, domain=DOMAIN, metadata=self.metadata
            )
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
        grpc.StatusCode.INVALID_ARGUMENT,
        Reason.INVALID_FIELD,
        f"invalid request: {summary}",
        violations,
    )


def order_not_found(ident: int) -> ServiceError:
    return _not_found(Reason.ORDER_NOT_FOUND, "order", ident)


def event_not_found(ident: int) -> ServiceError:
    return _not_found(Reason.EVENT_NOT_FOUND, "event", ident)


def _not_found(reason: Reason, kind: str, ident: int) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.NOT_FOUND,
        reason,
        f"{kind} {ident} does not exist",
        metadata={"id": str(ident)},
    )
