"""Counting the calls the service refused, for
`orderstream_refused_calls_total` by reason, in one place, whichever layer
raised the refusal: the Observer names the counter at the start of each
call, and the boundary counts a refusing status's reason before it is sent
(so a client that sees the status finds it counted).

The auth interceptor and the health servicer run outside the Observer and
count their own refusals."""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar

import grpc

from service.errors import ServiceError

# Codes that say the service would not do the call (who asks, what for, or
# how much), as opposed to the call failing.
REFUSING = frozenset(
    {
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)

# Each call runs in its own task, so the value is the call's own.
_count: ContextVar[Callable[[str], None] | None] = ContextVar("refusal_counter", default=None)


def counting(count: Callable[[str], None]) -> None:
    """Refusals of the current call are counted by `count`."""
    _count.set(count)


def note(error: ServiceError) -> None:
    """Counts `error` if it refuses the call."""
    if error.code in REFUSING and (count := _count.get()) is not None:
        count(error.reason.value)
