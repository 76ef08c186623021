"""What the unary writes keyed by a caller's `request_id` share: the body
digest that tells a retry from a reuse of the key, and the refusals of a
key that cannot be answered by the call it first came with."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import grpc
from google.protobuf.message import Message

from service.errors import Reason, ServiceError


def body_digest(request: Message) -> bytes:
    """Identifies `request` without its `request_id`, so a retry (the same
    body) can be told from a reuse of the key with another body."""
    body = type(request)()
    body.CopyFrom(request)
    body.ClearField("request_id")  # type: ignore[arg-type]  # every keyed request has one
    return hashlib.sha256(body.SerializeToString(deterministic=True)).digest()


def request_id_reused(what: str, metadata: Mapping[str, str] | None = None) -> ServiceError:
    """The key came before with another body; `what` names what it did then."""
    return ServiceError(
        grpc.StatusCode.ALREADY_EXISTS,
        Reason.REQUEST_ID_REUSED,
        f"request_id was already used for {what} with a different body",
        metadata=dict(metadata or {}),
    )


def concurrent_request() -> ServiceError:
    """The key's record conflicted, then was gone when read back (expired or
    deleted in between): a retry writes anew."""
    return ServiceError(
        grpc.StatusCode.ABORTED,
        Reason.CONCURRENT_REQUEST,
        "a concurrent request with this request_id did not complete; retry",
        retry_after=0.05,
    )
