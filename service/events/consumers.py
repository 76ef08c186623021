"""Durable consumers: the position the service keeps for each named
consumer of the event feed (docs/streams.md#durable-consumers).

A consumer is a row of `consumers` (migrations/0008_consumers.sql): its
acknowledged `position`, and `delivered`, the furthest position any of its
streams was sent. Every step is one statement on a pooled connection, so
it works from any replica and through a transaction-pooling PgBouncer, and
survives restarts: nothing of a consumer lives in a process.

- A stream naming a consumer creates it (at position 0) or reads its
  position (`open_consumer`), and before each message it writes records
  the message's position as delivered (`mark_delivered`).
- AckEvents moves the position forward only (`acknowledge`); a position
  past `delivered` is refused, since no stream sent it.
- The admin RPCs list, describe and reset consumers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import grpc

from orderstream.events.v1 import event_service_pb2
from service.db.codecs import timestamp
from service.db.runner import Database
from service.errors import Reason, ServiceError
from service.events import groups, sql
from service.rpc.validation import MAX_ID_LENGTH, Violations

# Lag is counted where it is small (rolled-back writes leave gaps in the
# ids); further behind, counting would scan that many index entries per
# consumer and reading, so the id distance stands in for it.
MAX_LAG_COUNT = 100_000
MAX_LISTED = 1000

# Creates the consumer or reads it; DO UPDATE (a no-op change) rather than
# DO NOTHING so that the row comes back in both cases, in one statement.
_OPEN = """
INSERT INTO consumers AS c (name) VALUES ($1)
ON CONFLICT (name) DO UPDATE SET name = c.name
RETURNING position
"""

# Only forward: a stream's messages go out in position order.
_MARK_DELIVERED = """
UPDATE consumers SET delivered = $2 WHERE name = $1 AND delivered < $2
"""

# The position moves to $2 if that is further and no further than was
# delivered (checked under the row's lock, so a concurrent delivery counts);
# otherwise the row as it is, and whether the acknowledgement took.
_ACK = """
WITH acked AS (
    UPDATE consumers SET position = greatest(position, $2), ack_time = now()
    WHERE name = $1 AND delivered >= $2
    RETURNING position, delivered
)
SELECT position, delivered, true AS acked FROM acked
UNION ALL
SELECT position, delivered, false FROM consumers
WHERE name = $1 AND NOT EXISTS (SELECT FROM acked)
"""

_RESET = """
UPDATE consumers
SET position = $2, delivered = greatest(delivered, $2), ack_time = now()
WHERE name = $1
RETURNING name
"""

# Consumers ($2: one name, or NULL for all) with their lag below the
# horizon $1: the final events after the position (the id distance beyond
# MAX_LAG_COUNT), and the age of the oldest of them by its `time`.
DESCRIBE = f"""
SELECT c.name, c.position, c.delivered, c.create_time, c.ack_time,
       CASE WHEN $1 - 1 - c.position > {MAX_LAG_COUNT} THEN $1 - 1 - c.position
            ELSE (SELECT count(*) FROM events e WHERE e.id > c.position AND e.id < $1)
       END AS lag_events,
       coalesce(greatest(0, extract(epoch FROM now() - (
            SELECT e.time FROM events e WHERE e.id > c.position AND e.id < $1
            ORDER BY e.id LIMIT 1))), 0)::float8 AS lag_seconds
FROM consumers c
WHERE $2::text IS NULL OR c.name = $2
ORDER BY c.name
LIMIT {MAX_LISTED}
"""


def check_name(v: Violations, field: str, name: str) -> None:
    v.text(field, name, max_length=MAX_ID_LENGTH)


def consumer_not_found(name: str, member: str = "") -> ServiceError:
    if member:
        return ServiceError(
            grpc.StatusCode.NOT_FOUND,
            Reason.CONSUMER_NOT_FOUND,
            f"no stream has named the member {member!r} of the consumer {name!r}, "
            "or it left the group",
            metadata={"consumer": name, "member": member},
        )
    return ServiceError(
        grpc.StatusCode.NOT_FOUND,
        Reason.CONSUMER_NOT_FOUND,
        f"no stream has named the consumer {name!r}",
        metadata={"consumer": name},
    )


async def open_consumer(db: Database, context: grpc.aio.ServicerContext, name: str) -> int:
    """The consumer's acknowledged position, creating it at 0."""
    row = await db.fetchrow(context, _OPEN, name)
    assert row is not None
    return int(row["position"])


async def mark_delivered(
    db: Database, context: grpc.aio.ServicerContext, name: str, position: int
) -> None:
    await db.fetch(context, _MARK_DELIVERED, name, position)


async def acknowledge(
    db: Database, context: grpc.aio.ServicerContext, request: event_service_pb2.AckEventsRequest
) -> event_service_pb2.AckEventsResponse:
    v = Violations()
    check_name(v, "consumer", request.consumer)
    if request.member:
        check_name(v, "member", request.member)
    if request.position <= 0:
        v.add("position", f"must be a position (> 0), got {request.position}")
    v.raise_if_any()
    if request.member:
        row = await db.fetchrow(
            context, groups.ACK, request.consumer, request.member, request.position
        )
    else:
        row = await db.fetchrow(context, _ACK, request.consumer, request.position)
    if row is None:
        raise consumer_not_found(request.consumer, request.member)
    if not row["acked"]:
        raise ServiceError(
            grpc.StatusCode.OUT_OF_RANGE,
            Reason.ACK_PAST_DELIVERED,
            f"position {request.position} is past what the consumer's streams were sent "
            f"(up to {row['delivered']}); acknowledge only what was received",
            metadata={
                "consumer": request.consumer,
                "position": str(request.position),
                "delivered": str(row["delivered"]),
            },
        )
    # A member without partitions moved none.
    return event_service_pb2.AckEventsResponse(position=row["position"] or 0)


async def _horizon(db: Database, context: grpc.aio.ServicerContext) -> int:
    row = await db.fetchrow(context, sql.SAFE_HORIZON)
    assert row is not None
    return int(row[0])


async def list_consumers(
    db: Database, context: grpc.aio.ServicerContext
) -> event_service_pb2.ListConsumersResponse:
    horizon = await _horizon(db, context)
    rows = await db.fetch(context, DESCRIBE, horizon, None)
    return event_service_pb2.ListConsumersResponse(consumers=[_consumer(row) for row in rows])


async def describe(
    db: Database, context: grpc.aio.ServicerContext, name: str, *, member_timeout: float
) -> event_service_pb2.Consumer:
    v = Violations()
    check_name(v, "name", name)
    v.raise_if_any()
    horizon = await _horizon(db, context)
    rows = await db.fetch(context, DESCRIBE, horizon, name)
    if not rows:
        raise consumer_not_found(name)
    consumer = _consumer(rows[0])
    for row in await db.fetch(context, groups.MEMBERS, name, member_timeout):
        consumer.members.add(
            name=row["member"],
            partitions=row["partitions"],
            delivered=row["delivered"],
            seen_time=timestamp(row["seen"]),
        )
    return consumer


async def reset(
    db: Database,
    context: grpc.aio.ServicerContext,
    request: event_service_pb2.ResetConsumerRequest,
    *,
    member_timeout: float,
) -> event_service_pb2.Consumer:
    v = Violations()
    check_name(v, "name", request.name)
    if request.position < 0:
        v.add("position", f"must be 0 (the start) or a position, got {request.position}")
    v.raise_if_any()
    horizon = await _horizon(db, context)
    if request.position >= horizon:
        raise ServiceError(
            grpc.StatusCode.OUT_OF_RANGE,
            Reason.POSITION_NOT_FINAL,
            f"position {request.position} is not below the feed's safe horizon ({horizon}): "
            "events could still be written at or below it",
            metadata={"position": str(request.position), "horizon": str(horizon)},
        )
    if await db.fetchrow(context, _RESET, request.name, request.position) is None:
        raise consumer_not_found(request.name)
    # A group's partitions too; its members restart there when their
    # partitions next change, or on their next stream.
    await db.fetch(context, groups.RESET, request.name, request.position)
    return await describe(db, context, request.name, member_timeout=member_timeout)


def _consumer(row: Mapping[str, Any]) -> event_service_pb2.Consumer:
    consumer = event_service_pb2.Consumer(
        name=row["name"],
        position=row["position"],
        delivered=row["delivered"],
        lag_events=row["lag_events"],
        lag_seconds=row["lag_seconds"],
        create_time=timestamp(row["create_time"]),
    )
    if row["ack_time"] is not None:
        consumer.ack_time.CopyFrom(timestamp(row["ack_time"]))
    return consumer
