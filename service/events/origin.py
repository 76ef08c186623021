"""Who may write which events. The feed is also the orders' change feed,
so the service's own events must not be forgeable: their types (`order.*`)
and their source (`orderstream`, written by service/orders/sql.py and
imports.py) are reserved, and no caller may write either. A caller whose
identity carries limits (service/rpc/write_limits.py) may write only the
types and sources they match.

Refusals are PERMISSION_DENIED naming the event's field and its value, and
the whole call writes nothing. `refusal` runs for every event of every
upload, so its common case, nothing to refuse, costs two string tests.
"""

from __future__ import annotations

import grpc

from service.errors import Reason, ServiceError
from service.rpc.write_limits import WriteLimits

RESERVED_TYPE_PREFIX = "order."
SERVICE_SOURCE = "orderstream"
# A refused value is quoted in ErrorInfo metadata up to this many characters.
_QUOTED_CHARS = 256


def refusal(
    event: str, event_type: str, source: str, limits: WriteLimits | None
) -> ServiceError | None:
    """Why the event at `event` (`events[3]`, `messages[1].events[3]`) may
    not be written by a caller with `limits`, or None if it may."""
    if event_type.startswith(RESERVED_TYPE_PREFIX):
        return _denied(
            Reason.RESERVED_EVENT_TYPE,
            f"{event}.type",
            event_type,
            f"event types {RESERVED_TYPE_PREFIX}* are reserved for the service's own order events",
        )
    if source == SERVICE_SOURCE:
        return _denied(
            Reason.RESERVED_EVENT_SOURCE,
            f"{event}.source",
            source,
            f"the source {SERVICE_SOURCE!r} is reserved for the service's own events",
        )
    if limits is None:
        return None
    for granted, field, value, reason, what in (
        (limits.types, "type", event_type, Reason.EVENT_TYPE_NOT_GRANTED, "event types"),
        (limits.sources, "source", source, Reason.EVENT_SOURCE_NOT_GRANTED, "sources"),
    ):
        if granted is not None and not granted.allows(value):
            return _denied(
                reason,
                f"{event}.{field}",
                value,
                f"the caller {limits.caller!r} may write only {what} {granted.text}",
                limits.caller,
            )
    return None


def _denied(
    reason: Reason, field: str, value: str, why: str, caller: str | None = None
) -> ServiceError:
    quoted = value[:_QUOTED_CHARS]
    metadata = {"field": field, "value": quoted}
    if caller is not None:
        metadata["caller"] = caller
    return ServiceError(
        grpc.StatusCode.PERMISSION_DENIED,
        reason,
        f"{field}: {why}; nothing was written",
        metadata=metadata,
    )
