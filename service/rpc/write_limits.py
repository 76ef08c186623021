"""What one caller may write: optional limits on the `type` and `source`
of the events it writes, granted with its identity (a tokens-file line's
`types=` and `sources=` fields, service/rpc/auth.py).

A limit is a comma-separated list of patterns; a pattern ending in `*`
matches every value that starts with what comes before it (`billing.*`,
`/billing/*`), any other pattern matches only itself. A caller without a
limit may write any type or source, except those the service reserves for
its own events (service/events/origin.py), which no grant opens.

The interceptor that identifies the caller binds its limits to the call
(`bind`), in a context variable: grpc.aio runs a call's interceptors and
its handler in one task, and each call in a task of its own, so the
handler sees its own caller's limits and no other's. A call made without
caller authentication has no limits.
"""

from __future__ import annotations

import contextvars
from collections.abc import Sequence
from dataclasses import dataclass

# The fields a tokens-file line may add after its scopes, in this spelling.
FIELDS = ("types", "sources")
_MAX_PATTERN_CHARS = 1024


@dataclass(frozen=True, slots=True)
class Patterns:
    """One limit: the values it matches exactly and the prefixes it
    matches; `text` as it was written, for messages."""

    exact: frozenset[str]
    prefixes: tuple[str, ...]
    text: str

    def allows(self, value: str) -> bool:
        return value in self.exact or value.startswith(self.prefixes)


@dataclass(frozen=True, slots=True)
class WriteLimits:
    """The limits of one caller (`caller`: its name, for messages and logs);
    None for a limit that was not given."""

    caller: str
    types: Patterns | None
    sources: Patterns | None


def parse(caller: str, fields: Sequence[str]) -> WriteLimits | None:
    """The limits in `fields` (each `types=...` or `sources=...`, at most
    once each), or None when there are none. Raises ValueError saying what
    is wrong, without repeating the line."""
    given: dict[str, Patterns] = {}
    for field in fields:
        key, equals, value = field.partition("=")
        if not equals or key not in FIELDS:
            raise ValueError(
                "after the scopes, only types=PATTERN,... and sources=PATTERN,... may follow"
            )
        if key in given:
            raise ValueError(f"{key}= is given twice")
        given[key] = _patterns(key, value)
    if not given:
        return None
    return WriteLimits(caller, given.get("types"), given.get("sources"))


def _patterns(key: str, text: str) -> Patterns:
    exact: set[str] = set()
    prefixes: list[str] = []
    for pattern in text.split(","):
        if not pattern or len(pattern) > _MAX_PATTERN_CHARS or "*" in pattern[:-1]:
            raise ValueError(
                f"{key}= takes a comma-separated list of values of 1 to "
                f"{_MAX_PATTERN_CHARS} characters, each with `*` only at its end"
            )
        if pattern.endswith("*"):
            prefixes.append(pattern[:-1])
        else:
            exact.add(pattern)
    return Patterns(frozenset(exact), tuple(prefixes), text)


_CURRENT: contextvars.ContextVar[WriteLimits | None] = contextvars.ContextVar(
    "orderstream_write_limits", default=None
)


def bind(limits: WriteLimits | None) -> None:
    """Makes `limits` the current call's (called by the interceptor that
    identified the caller, in the call's own task)."""
    _CURRENT.set(limits)


def current() -> WriteLimits | None:
    """The limits of the caller of the call being handled, if any."""
    return _CURRENT.get()
