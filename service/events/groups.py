"""Consumer groups: streams of one durable consumer with distinct member
names split the feed by subject (docs/streams.md#consumer-groups).

Each subject hashes to one of `PARTITIONS` partitions (the first four bytes
of its MD5, big-endian, modulo 16: any client can compute it). Each
partition has its own acknowledged position (`consumer_partitions`,
migrations/0010_consumer_groups.sql). The live members are the rows of
`consumer_members` seen within the member timeout; every member's stream
refreshes its own row and reads that list every third of the timeout, and
assigns itself the partitions p with p % len(members) == its index among
the members sorted by name. No coordinator: every member computes the same
assignment from the same rows, and each one is one statement on a pooled
connection, so groups work across replicas and behind PgBouncer.

A new member waits a third of the timeout before it first takes its
partitions: by then every other member has looked at the group and given
up the ones it takes, so a join reads almost nothing twice, and members
started together settle at once.

When its partitions change, a member's stream restarts from the lowest
acknowledged position among its new partitions, sending each partition's
events after that partition's own position (`GroupFilter`): what a member
that left had not acknowledged is sent again, at least once. Until every
member has refreshed (a third of the timeout), a partition may be read by
its old and its new member both; each still gets it in id order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import grpc

from service.db.runner import Database

PARTITIONS = 16


def partition_of(subject: str) -> int:
    return int.from_bytes(hashlib.md5(subject.encode()).digest()[:4], "big") % PARTITIONS


@dataclass(frozen=True, slots=True)
class GroupFilter:
    """A member's share of the feed: the events of its partitions, each
    after that partition's position when the member's partitions last
    changed. `starts[p]` is partition p's, -1 for a partition not its own."""

    starts: tuple[int, ...]

    @classmethod
    def of(cls, starts: Mapping[int, int]) -> GroupFilter:
        return cls(tuple(starts.get(p, -1) for p in range(PARTITIONS)))

    def lowest(self, default: int) -> int:
        return min((start for start in self.starts if start >= 0), default=default)

    def accepts(self, event_id: int, subject: str) -> bool:
        start = self.starts[partition_of(subject)]
        return start >= 0 and event_id > start


def assigned(members: Sequence[str], member: str) -> list[int]:
    """The partitions `member` reads among the live `members`."""
    ordered = sorted({*members, member})
    index, count = ordered.index(member), len(ordered)
    return [p for p in range(PARTITIONS) if p % count == index]


# The partitions start where the consumer is, the first time a member
# joins; the member's row is created or refreshed; rows of members gone
# for a day (whose process died: a stream that ends deletes its own) go.
_JOIN = f"""
WITH parts AS (
    INSERT INTO consumer_partitions (consumer, partition, position)
    SELECT c.name, p, c.position
    FROM consumers c, generate_series(0, {PARTITIONS - 1}) AS p
    WHERE c.name = $1
    ON CONFLICT DO NOTHING
), gone AS (
    DELETE FROM consumer_members
    WHERE consumer = $1 AND member <> $2 AND seen < now() - interval '1 day'
)
INSERT INTO consumer_members AS m (consumer, member) VALUES ($1, $2)
ON CONFLICT (consumer, member) DO UPDATE SET seen = now()
"""

# Refreshes the member's row and lists the live members ($3: the timeout
# in seconds); the refreshed row is not visible to the list (one snapshot),
# so the caller adds itself.
_REFRESH = """
WITH me AS (
    UPDATE consumer_members SET seen = now() WHERE consumer = $1 AND member = $2
)
SELECT member FROM consumer_members
WHERE consumer = $1 AND seen > now() - make_interval(secs => $3)
"""

_LEAVE = "DELETE FROM consumer_members WHERE consumer = $1 AND member = $2"

# A member's new partitions and where its stream restarts.
_REASSIGN = """
UPDATE consumer_members
SET partitions = $3, delivered = $4, max_delivered = greatest(max_delivered, $4)
WHERE consumer = $1 AND member = $2
"""

_POSITIONS = """
SELECT partition, position FROM consumer_partitions
WHERE consumer = $1 AND partition = ANY($2::integer[])
"""

_MARK_DELIVERED = """
UPDATE consumer_members
SET delivered = greatest(delivered, $3), max_delivered = greatest(max_delivered, $3)
WHERE consumer = $1 AND member = $2
"""

# The member's partitions move to $3, capped at where its stream restarted,
# unless $3 is past anything it was sent; the consumer's own position is
# the lowest of its partitions' (for lag and retention). Returns the
# member's row and its partitions' lowest position afterwards.
ACK = """
WITH m AS (
    SELECT delivered, max_delivered, partitions FROM consumer_members
    WHERE consumer = $1 AND member = $2
), moved AS (
    UPDATE consumer_partitions p
    SET position = greatest(p.position, least($3, m.delivered))
    FROM m
    WHERE p.consumer = $1 AND p.partition = ANY(m.partitions) AND $3 <= m.max_delivered
    RETURNING p.partition, p.position
), consumer AS (
    UPDATE consumers c
    SET position = greatest(c.position, (
            SELECT min(coalesce(moved.position, p.position))
            FROM consumer_partitions p LEFT JOIN moved USING (partition)
            WHERE p.consumer = $1)),
        ack_time = now()
    WHERE c.name = $1 AND EXISTS (SELECT FROM moved)
)
SELECT m.max_delivered AS delivered, $3 <= m.max_delivered AS acked,
       (SELECT min(position) FROM moved) AS position
FROM m
"""

# GetConsumer: the live members ($2: the timeout in seconds).
MEMBERS = """
SELECT member, partitions, delivered, seen FROM consumer_members
WHERE consumer = $1 AND seen > now() - make_interval(secs => $2)
ORDER BY member
"""

# ResetConsumer moves every partition too.
RESET = "UPDATE consumer_partitions SET position = $2 WHERE consumer = $1"


class Membership:
    """One member stream's place in its group."""

    def __init__(
        self, db: Database, context: grpc.aio.ServicerContext, consumer: str, member: str
    ) -> None:
        self._db = db
        self._context = context
        self.consumer = consumer
        self.member = member
        self.partitions: list[int] | None = None

    async def join(self) -> None:
        await self._db.fetch(self._context, _JOIN, self.consumer, self.member)

    async def live_members(self, timeout: float) -> list[str]:
        rows = await self._db.fetch(self._context, _REFRESH, self.consumer, self.member, timeout)
        return sorted({row[0] for row in rows} | {self.member})

    async def reassign(self, partitions: list[int], restart_default: int) -> GroupFilter:
        """Takes `partitions`; the filter a stream restarting now reads
        with (it restarts at its lowest start, or `restart_default` with no
        partition)."""
        rows = await self._db.fetch(self._context, _POSITIONS, self.consumer, partitions)
        group = GroupFilter.of({row[0]: row[1] for row in rows})
        restart = group.lowest(default=restart_default)
        await self._db.fetch(
            self._context, _REASSIGN, self.consumer, self.member, partitions, restart
        )
        self.partitions = partitions
        return group

    async def mark_delivered(self, position: int) -> None:
        await self._db.fetch(self._context, _MARK_DELIVERED, self.consumer, self.member, position)

    async def leave(self) -> None:
        await self._db.fetch(self._context, _LEAVE, self.consumer, self.member)
