"""What a statement that answers several calls needs (CreateOrder's batches,
service/orders/create_batches.py; point reads, service/db/point_reads.py):
the deadline it runs under, and how its calls learn that it failed."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from service.db.runner import Call


class LongestDeadline:
    """The deadline a statement for several calls runs under: the longest
    of theirs (none if any call has none)."""

    __slots__ = ("_calls",)

    def __init__(self, calls: list[Call]) -> None:
        self._calls = calls

    def time_remaining(self) -> float | None:
        longest = 0.0
        for call in self._calls:
            remaining = call.time_remaining()
            if remaining is None:
                return None
            longest = max(longest, remaining)
        return longest


def fail(outcomes: Iterable[asyncio.Future[Any]], error: BaseException) -> None:
    """Ends each call's outcome still open with the statement's failure, as
    the same failure would have ended a statement of the call's own: with
    the error, or cancelled when the statement was (the server stopping)."""
    for outcome in outcomes:
        if outcome.done():
            continue
        if isinstance(error, asyncio.CancelledError):
            outcome.cancel()
        else:
            outcome.set_exception(error)
