"""What a StreamEvents stream with `progress` tells its caller besides
events (docs/streams.md#progress): heartbeats with its position while its
filter matches nothing, once that it caught up with the live end, and a
group member's partitions when they change.

`Progress` only keeps the books (what was told, and when) and builds the
messages; the stream writes them like any other message, so a consumer's
delivered position covers them too.
"""

from __future__ import annotations

import asyncio

from orderstream.events.v1 import event_service_pb2
from service.rpc.encoded import Encoded


class Progress:
    def __init__(self, *, asked: bool, interval: float, position: int) -> None:
        """`asked`: the request's `progress`; `interval`: the heartbeat
        interval; `position`: where the stream starts."""
        self.asked = asked
        self._interval = interval
        self._loop = asyncio.get_running_loop()
        # The last position the caller was told of, by events or progress,
        # and when: what a heartbeat is due on.
        self._told = position
        self._told_at = self._loop.time()
        self.caught_up = False

    def told(self, position: int) -> None:
        """The caller was sent a message reaching `position`."""
        self._told = position
        self._told_at = self._loop.time()

    def restart(self, position: int) -> None:
        """The stream starts again at `position` (a resumed consumer, a
        group member's new partitions): nothing after it is told yet."""
        self._told = position
        self.caught_up = False

    def due_in(self, position: int) -> float | None:
        """Seconds until a heartbeat is due at `position`; None when none
        will be (not asked for, or nothing untold)."""
        if not self.asked or position <= self._told:
            return None
        return max(0.0, self._told_at + self._interval - self._loop.time())

    def heartbeat(self, position: int, *, now: bool = False) -> Encoded | None:
        """The heartbeat to send at `position`, if one is due (or, with
        `now`, if anything is untold: a history stream's end)."""
        due = self.due_in(position)
        if due == 0.0 or (now and due is not None):
            return message(position)
        return None

    def live_end(self, position: int) -> Encoded | None:
        """The caught-up marker, the first time the stream reaches the live
        end (after a start or restart)."""
        first = not self.caught_up
        self.caught_up = True
        return message(position, caught_up=True) if self.asked and first else None

    def partitions(self, position: int, partitions: list[int], members: int) -> Encoded | None:
        """A group member's new partitions, where its stream restarts."""
        if not self.asked:
            return None
        return message(position, partitions=partitions, members=members)


def message(
    position: int,
    *,
    caught_up: bool = False,
    partitions: list[int] | None = None,
    members: int = 0,
) -> Encoded:
    """A StreamEventsResponse with `progress` and no events, as the wire
    bytes the stream writes (service/rpc/encoded.py), carrying no rows."""
    response = event_service_pb2.StreamEventsResponse(
        progress=event_service_pb2.StreamProgress(
            position=position, caught_up=caught_up, partitions=partitions, members=members
        )
    )
    return Encoded(response.SerializeToString(), 0)
