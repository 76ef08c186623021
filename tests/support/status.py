"""The google.rpc.Status details of a failed call, unpacked as a client
library would."""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass, field

import grpc
from google.rpc import error_details_pb2, status_pb2


@dataclass
class StatusDetails:
    code: grpc.StatusCode
    message: str
    error_info: error_details_pb2.ErrorInfo | None = None
    violations: dict[str, str] = field(default_factory=dict)
    retry_info: error_details_pb2.RetryInfo | None = None
    error_info_count: int = 0


def details(error: grpc.aio.AioRpcError) -> StatusDetails:
    """Unpacks google.rpc.Status from the trailers, as a client library would."""
    found = StatusDetails(error.code(), error.details() or "")
    raw = dict(error.trailing_metadata() or ()).get("grpc-status-details-bin")
    if raw is None:
        return found
    status = status_pb2.Status.FromString(raw)
    assert status.code == error.code().value[0]
    for any_detail in status.details:
        for kind in (
            error_details_pb2.ErrorInfo,
            error_details_pb2.BadRequest,
            error_details_pb2.RetryInfo,
        ):
            if any_detail.Is(kind.DESCRIPTOR):
                detail = kind()
                any_detail.Unpack(detail)
                if isinstance(detail, error_details_pb2.ErrorInfo):
                    found.error_info = detail
                    found.error_info_count += 1
                elif isinstance(detail, error_details_pb2.BadRequest):
                    found.violations = {v.field: v.description for v in detail.field_violations}
                else:
                    found.retry_info = detail
    return found


async def rpc_error(call: Awaitable[object]) -> StatusDetails:
    """Awaits a call that must fail; returns its status details."""
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return details(error)
    raise AssertionError("the call succeeded")
