"""The feed's shared tail: the newest final events of the feed, held once per
process for every follower, bounded in bytes.

The feed's own connection (service/events/feed.py) reads each newly final
range of the events table once and appends it here, already encoded as
StreamEvents wire entries. Followers then read from memory at their own
pace, each through its own filter, instead of every follower asking the
database for its own horizon and range on every commit: the database work
of following is constant per process, not proportional to followers.

The tail covers the positions (floor, horizon - 1]: every final event with
an id in that range is held here, in order. A follower whose position is
below the floor (it started further back, or fell behind what the byte
budget keeps) reads the table up to the floor first, then joins. With no
follower at all the tail holds nothing: it only moves its horizon, so a
process that nobody follows pays no memory for it.

Followers with the same filter at the same position get the very same
message: it is built once per round and shared (`next_message`).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import math
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from service.events.groups import GroupFilter
from service.events.wire import encode_events
from service.rpc.encoded import Encoded

# What holding one event costs besides its wire bytes (its id, type and
# subject objects and list slots), counted against the budget so that it
# bounds memory, not just payloads.
ENTRY_OVERHEAD = 200

# Rows a follower's look at the tail may pass over without finding one that
# matches its filter, before it yields to the loop (a rare filter far
# behind the horizon must not hold the loop for a whole buffer's scan).
SCAN_ROWS = 5000

# The fan-out of a round has ended once this share of the followers it
# woke are waiting again (`settled_at`, for the feed's pacing,
# service/events/pacing.py): the others may have slow readers.
SETTLED = 0.9


@dataclass(frozen=True, slots=True)
class Filter:
    """What a follower asked for; empty means everything."""

    types: frozenset[str] = frozenset()
    subject: str = ""
    # A consumer group member's partitions (service/events/groups.py).
    group: GroupFilter | None = None

    def key(self) -> tuple[frozenset[str], str, GroupFilter | None]:
        return (self.types, self.subject, self.group)


@dataclass(frozen=True, slots=True)
class _Segment:
    """Events read in one page: every final event with after < id <= upto."""

    after: int
    upto: int
    ids: list[int]
    types: list[str]
    subjects: list[str]
    wires: list[bytes]  # each event's StreamEventsResponse `events` entry
    size: int  # bytes held by `wires`


class Tail:
    def __init__(self, buffer_bytes: int) -> None:
        self._budget = buffer_bytes
        self._segments: deque[_Segment] = deque()
        self._uptos: list[int] = []  # each segment's `upto`, for bisect
        self._size = 0
        self._horizon: int | None = None
        self.live = False  # the feed's connection is reading for us
        self.followers = 0
        self.generation = 0
        # Retention deleted every event up to it before the feed read them:
        # followers further back must not read on past the gap.
        self.truncated_upto = 0
        self._changed = asyncio.Event()
        self._waiting = 0  # followers waiting in `wait`
        self._settle_mark = -1  # `_waiting` at which the fan-out has ended
        self.settled_at = 0.0  # time.monotonic() when the last fan-out ended
        # (position, filter, budget) -> the message that follows: built once
        # per generation for all followers that ask the same.
        self._shared: dict[
            tuple[int, tuple[frozenset[str], str, GroupFilter | None], int], tuple[Any, int]
        ] = {}

    @property
    def ready(self) -> bool:
        return self._horizon is not None

    @property
    def horizon(self) -> int:
        """Every final event with an id below it has been read."""
        assert self._horizon is not None, "the tail has not started"
        return self._horizon

    @property
    def floor(self) -> int:
        """The tail holds every final event with an id above it."""
        return self._segments[0].after if self._segments else self.horizon - 1

    @property
    def size(self) -> int:
        """Bytes of events held."""
        return self._size

    def start_at(self, horizon: int) -> None:
        """The first horizon the feed's connection saw; the tail holds
        nothing below it. A reconnect does not call this: the tail goes on
        from where it was, so nothing is missed."""
        if self._horizon is None:
            self._horizon = horizon
            self._wake()

    @contextlib.contextmanager
    def following(self) -> Iterator[None]:
        """Registers a follower for as long as it follows."""
        self.followers += 1
        try:
            yield
        finally:
            self.followers -= 1

    def skip_to(self, horizon: int) -> None:
        """Moves the horizon without reading: nobody follows, so the tail
        drops what it held and holds nothing below `horizon`."""
        self._segments.clear()
        self._uptos.clear()
        self._size = 0
        self._horizon = horizon
        self._wake()

    def set_live(self, live: bool) -> None:
        if live != self.live:
            self.live = live
            self._wake()

    def append(self, after: int, upto: int, rows: Sequence[Any]) -> None:
        """Adds the final events with after < id <= upto (`rows`, in id
        order, all of them), then drops the oldest while over budget."""
        assert after == self.horizon - 1, "segments must follow each other"
        if not rows:
            self._extend(upto)
            return
        wires = [encode_events(rows, n, 0, 1)[0] for n in range(len(rows))]
        segment = _Segment(
            after=after,
            upto=upto,
            ids=[row[0] for row in rows],
            types=[row[1] for row in rows],
            subjects=[row[3] for row in rows],
            wires=wires,
            size=sum(map(len, wires)) + ENTRY_OVERHEAD * len(wires),
        )
        self._segments.append(segment)
        self._uptos.append(upto)
        self._size += segment.size
        # Keep the newest segment even if it alone is over budget: it holds
        # at most one page, bounded like every fetch.
        while self._size > self._budget and len(self._segments) > 1:
            dropped = self._segments.popleft()
            self._uptos.pop(0)
            self._size -= dropped.size
        self._horizon = upto + 1
        self._wake()

    def _extend(self, upto: int) -> None:
        """No events in (horizon - 1, upto]: the newest segment, if any,
        now covers them too (so empty rounds add no segments)."""
        if self._segments:
            self._segments[-1] = replace(self._segments[-1], upto=upto)
            self._uptos[-1] = upto
        self._horizon = upto + 1
        self._wake()

    def truncated(self, upto: int) -> None:
        """The feed found every event up to `upto` deleted by retention."""
        if upto > self.truncated_upto:
            self.truncated_upto = upto
            self._wake()

    def close(self) -> None:
        self._wake()

    async def wait(self, seen: int, timeout: float | None = None) -> None:
        """Returns once the generation moved past `seen` (new events, the
        connection lost or regained, shutdown), or after `timeout`."""
        if self.generation != seen:
            return
        self._waiting += 1
        if self._waiting == self._settle_mark:
            self.settled_at = time.monotonic()
            self._settle_mark = -1
        try:
            if timeout is None:  # a follower at the live end: every round
                await self._changed.wait()
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout)
        finally:
            self._waiting -= 1

    def next_message(
        self, position: int, wanted: Filter, budget: int
    ) -> tuple[Encoded | None, int]:
        """The next message for a follower at `position` (floor <= position
        < horizon - 1): the matching events after it, up to `budget` bytes
        (one event at least), and the position it reaches. No message when
        nothing matched in what was looked at; the position still moves on,
        so the follower never looks at those events again."""
        key = (position, wanted.key(), budget)
        shared = self._shared.get(key)
        if shared is None:
            shared = self._shared[key] = self._build(position, wanted, budget)
        return shared

    def _build(self, position: int, wanted: Filter, budget: int) -> tuple[Encoded | None, int]:
        chunks: list[bytes] = []
        size = 0
        scanned = 0
        last = position  # the id of the last event put in the message
        types, subject, group = wanted.types, wanted.subject, wanted.group
        first = bisect.bisect_right(self._uptos, position)
        for index in range(first, len(self._segments)):
            segment = self._segments[index]
            ids = segment.ids
            start = bisect.bisect_right(ids, position)
            for n in range(start, len(ids)):
                if (
                    (types and segment.types[n] not in types)
                    or (subject and segment.subjects[n] != subject)
                    or (group and not group.accepts(ids[n], segment.subjects[n]))
                ):
                    scanned += 1
                    if scanned >= SCAN_ROWS and not chunks:
                        return None, ids[n]
                    continue
                wire = segment.wires[n]
                if chunks and size + len(wire) > budget:
                    return Encoded(b"".join(chunks), len(chunks)), last
                chunks.append(wire)
                size += len(wire)
                last = ids[n]
            position = segment.upto
        message = Encoded(b"".join(chunks), len(chunks)) if chunks else None
        return message, position

    def _wake(self) -> None:
        self.generation += 1
        # The waiting followers are counted out as each resumes, and back
        # in as each waits again.
        self._settle_mark = math.ceil(SETTLED * self._waiting) if self._waiting else -1
        self._shared.clear()
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
