"""The error map (service/rpc/status_map.py) on errors a real PostgreSQL
raises: each SQLSTATE the map names becomes its gRPC status with exactly one
ErrorInfo and, where a retry can succeed, RetryInfo; the database layer's
own exceptions become theirs; anything unknown is INTERNAL with an incident
id and nothing of the error's text."""

from __future__ import annotations

import asyncpg
import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from service.db.failures import CallDeadlineReached, DatabaseNotAnswering, PoolExhausted
from service.errors import Reason, ServiceError
from service.rpc.status_map import from_exception

# Statements that make PostgreSQL raise one SQLSTATE each, in a transaction
# that is rolled back. Where no ordinary statement can (a serialization
# failure, a deadlock), PL/pgSQL raises the SQLSTATE itself.
CASES = {
    "unique-violation": (
        "CREATE TEMP TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1), (1)",
        grpc.StatusCode.ALREADY_EXISTS,
        "ALREADY_EXISTS",
        False,
    ),
    "foreign-key-violation": (
        "CREATE TEMP TABLE p (id int PRIMARY KEY);"
        "CREATE TEMP TABLE c (p int REFERENCES p); INSERT INTO c VALUES (7)",
        grpc.StatusCode.FAILED_PRECONDITION,
        "REFERENCE_MISSING",
        False,
    ),
    "serialization-failure": (
        "DO $$ BEGIN RAISE EXCEPTION 'conflict' USING ERRCODE = '40001'; END $$",
        grpc.StatusCode.ABORTED,
        "SERIALIZATION_FAILURE",
        True,
    ),
    "deadlock": (
        "DO $$ BEGIN RAISE EXCEPTION 'deadlock' USING ERRCODE = '40P01'; END $$",
        grpc.StatusCode.ABORTED,
        "DEADLOCK",
        True,
    ),
    "statement-cancelled": (
        "SET LOCAL statement_timeout = '10ms'; SELECT pg_sleep(5)",
        grpc.StatusCode.DEADLINE_EXCEEDED,
        "DEADLINE_EXCEEDED",
        False,
    ),
    "bad-data": (
        "SELECT 1 / 0",
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_DATA",
        False,
    ),
}


def status_of(error: ServiceError) -> status_pb2.Status:
    trailers = dict(error.to_status().trailing_metadata)
    return status_pb2.Status.FromString(trailers["grpc-status-details-bin"])


def error_infos(status: status_pb2.Status) -> list[error_details_pb2.ErrorInfo]:
    found = []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            found.append(info)
    return found


def has_retry_info(status: status_pb2.Status) -> bool:
    return any(d.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for d in status.details)


async def raised_by(db: asyncpg.Pool, sql: str) -> asyncpg.PostgresError:
    async with db.acquire() as conn:
        transaction = conn.transaction()
        await transaction.start()
        try:
            await conn.execute(sql)
        except asyncpg.PostgresError as exc:
            return exc
        finally:
            await transaction.rollback()
    raise AssertionError(f"no error from {sql!r}")


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
async def test_postgres_errors_map_to_their_status(admin_db, case):
    sql, code, reason, retryable = CASES[case]
    error = from_exception(await raised_by(admin_db, sql), "Test")
    assert (error.code, error.reason) == (code, reason)
    status = status_of(error)
    assert status.code == code.value[0]
    assert [info.reason for info in error_infos(status)] == [reason]
    assert has_retry_info(status) == retryable


@pytest.mark.parametrize(
    ("failure", "code", "reason", "retry_after"),
    [
        (PoolExhausted(2.5), grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.POOL_EXHAUSTED, 2.5),
        (
            DatabaseNotAnswering(2.5),
            grpc.StatusCode.UNAVAILABLE,
            Reason.DATABASE_UNAVAILABLE,
            1.0,
        ),
        (CallDeadlineReached(), grpc.StatusCode.DEADLINE_EXCEEDED, Reason.DEADLINE_EXCEEDED, None),
    ],
    ids=["pool-exhausted", "database-not-answering", "call-deadline-reached"],
)
def test_database_layer_failures_map_to_their_status(failure, code, reason, retry_after):
    """service/db/ raises its own exceptions, without gRPC; RetryInfo after a
    busy pool waits out the acquire timeout it just waited."""
    error = from_exception(failure, "Test")
    assert (error.code, error.reason, error.retry_after) == (code, reason, retry_after)
    assert [info.reason for info in error_infos(status_of(error))] == [reason.value]


async def test_unknown_errors_are_internal_with_an_incident_and_no_text(caplog):
    secret = "SELECT password FROM accounts -- hunter2"
    error = from_exception(ValueError(secret), "Test")
    assert error.code == grpc.StatusCode.INTERNAL
    incident = error.metadata["incident"]
    assert incident in error.message
    assert secret not in error.message
    (info,) = error_infos(status_of(error))
    assert (info.reason, info.metadata["incident"]) == ("INTERNAL", incident)
    # The traceback is logged under the same incident for the operator.
    assert any(getattr(r, "incident", None) == incident for r in caplog.records)


# --------------------------------------------------------------------------
# Connections the server ends at an awkward moment (found by the fault soak,
# tests/faults/test_soak.py): a status the caller can act on, never INTERNAL.
# --------------------------------------------------------------------------


def test_a_connection_asyncpg_lost_track_of_is_unavailable():
    """What asyncpg raises for the next statement when it read the server's
    FATAL (pg_terminate_backend, a crash) while idle: the statement was never
    sent, so the caller may retry."""
    exc = asyncpg.InternalClientError(
        "cannot switch to state 12; another operation (2) is in progress"
    )
    error = from_exception(exc, "Test")
    assert (error.code, error.reason) == (grpc.StatusCode.UNAVAILABLE, "DATABASE_UNAVAILABLE")
    assert has_retry_info(status_of(error))
