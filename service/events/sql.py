"""The SQL of EventService; every value from a request is a $n parameter
(the payload limit, a constant of the code, is written in)."""

import enum
from collections.abc import Sequence
from typing import Any

from service.events.payload import MAX_PAYLOAD_BYTES

# events_publish (migrations/0012_write_functions.sql, which says why the
# writes are functions): $1-$5 the events' types, sources, subjects, times and
# payloads. Rows are inserted in request order, and ids are drawn in insertion
# order, so the ascending ids returned map one to one onto the request's events.
PUBLISH_EVENTS = "SELECT id FROM events_publish($1, $2, $3, $4, $5)"

# PUBLISH_EVENTS with a request_id ($6) and the body's digest ($7): the
# events and the record of the ids they were given, one statement, hence one
# transaction. The record is a plain INSERT, not ON CONFLICT: a key already
# committed fails the statement on publish_requests_pkey (after waiting for
# a concurrent insert of the same key to commit or roll back), so nothing
# of a retry is written, and the caller reads the record instead.
PUBLISH_KEYED_EVENTS = "SELECT id FROM events_publish_keyed($1, $2, $3, $4, $5, $6, $7)"

PUBLISH_REQUEST = "SELECT request_hash, event_ids FROM publish_requests WHERE request_id = $1"

# Run only once PUBLISH_EVENTS failed on the table's events_payload_size
# CHECK: the payloads ($1, as PUBLISH_EVENTS got them) that jsonb writes out
# over the limit, by their 0-based index in the request. Python's checks
# bound the numbers' growth but not jsonb's added spaces, so the database,
# which decided, measures again.
OVERSIZED_PAYLOADS = f"""
SELECT p.n - 1 AS index, octet_length(p.payload::jsonb::text) AS bytes
FROM unnest($1::text[]) WITH ORDINALITY AS p (payload, n)
WHERE octet_length(p.payload::jsonb::text) > {MAX_PAYLOAD_BYTES}
ORDER BY p.n
"""

# What readers select, in this column order (service/events/wire.c reads
# rows positionally): the payload, or NULL when its stored written-out size
# is over the limit (rows from before migration 0004, or written behind the
# service's back: the table's CHECK is NOT VALID), and that size, which the
# reader then sends as omitted_payload_bytes. The event keeps its place in
# the feed, and no reader is handed a message it cannot take.
EVENT_COLUMNS = f"""id, type, source, subject, time,
       CASE WHEN payload_bytes <= {MAX_PAYLOAD_BYTES} THEN payload::text END AS payload,
       payload_bytes"""

# GetEvent: the events of the calls that arrive together, in one statement
# (service/db/point_reads.py); $1 their ids.
GET_EVENTS = f"""
SELECT {EVENT_COLUMNS}
FROM events WHERE id = ANY($1::bigint[])
"""

# See migrations/0002_streaming.sql: every id below the result is final. Run
# it as its own statement, before the snapshot that reads the range.
SAFE_HORIZON = "SELECT events_safe_horizon()"


# The most rows and bytes (as `row_bytes` counts them) one page of events
# may hold: a stream holds one page and reads the next meanwhile.
PAGE_ROWS = 5000
PAGE_BYTES = 1 << 20
# The rows of a history read's first page (service/events/stream.py).
FIRST_PAGE_ROWS = 512


def row_bytes(row: Sequence[Any]) -> int:
    """What a row of `events_page` counts toward the page's byte budget:
    the same sum the statement takes (characters count four bytes each,
    UTF-8's most, so the count never falls short of the wire size)."""
    return row[6] + 4 * (len(row[1]) + len(row[2]) + len(row[3])) + 32


def page_is_cut(rows: Sequence[Sequence[Any]], limit: int) -> bool:
    """Whether `events_page` (with `limit` rows and PAGE_BYTES) stopped
    before the end of its range, so that more events may follow the last
    row."""
    return len(rows) == limit or sum(map(row_bytes, rows)) >= PAGE_BYTES


def next_limit(rows: Sequence[Sequence[Any]], limit: int) -> int:
    """The row limit for the page after `rows` (read with `limit`): twice
    what fitted the byte budget, so that pages of large events do not make
    PostgreSQL look at thousands of rows to return a few; and growing again,
    up to PAGE_ROWS, while pages fill up by rows."""
    if len(rows) == limit:
        return min(PAGE_ROWS, 2 * limit)
    return min(PAGE_ROWS, max(64, 2 * len(rows)))


# The most distinct types a page reads as one ordered scan per type, merged.
MERGED_TYPES = 8


class Types(enum.Enum):
    """How a page is filtered by event type: each has its statement."""

    ANY = "any"  # no type filter
    ONE = "one"  # type = $3
    SOME = "some"  # 2..MERGED_TYPES types, $3 padded with NULLs: one scan each, merged
    MANY = "many"  # more: type = ANY($3)


def type_filter(types: Sequence[str]) -> tuple[Types, list[object]]:
    """How a page filters by `types` (repeats count once), and the
    parameters that filter takes: none, a type, or an array of them."""
    distinct = sorted(set(types))
    if not distinct:
        return Types.ANY, []
    if len(distinct) == 1:
        return Types.ONE, [distinct[0]]
    if len(distinct) <= MERGED_TYPES:
        padded: list[str | None] = [*distinct, *[None] * (MERGED_TYPES - len(distinct))]
        return Types.SOME, [padded]
    return Types.MANY, [distinct]


# A subject's partition of a consumer group, as service/events/groups.py's
# `partition_of` computes it: the first four bytes of its MD5, big-endian
# (a 32-bit bit string cast to bigint is unsigned), modulo the partitions.
PARTITION_OF_SUBJECT = "(('x' || left(md5(subject), 8))::bit(32)::bigint % {partitions})::integer"


def events_page(*, types: Types, with_subject: bool, partitions: int = 0) -> str:
    """Events with $1 < id < $2, ascending, then optional filters (type =
    $3 or type = ANY($3), subject = $n, with `partitions` the subject's
    partition = ANY($n)), at most $n rows and, after the first row, no more
    than $n bytes (PAGE_BYTES) as `row_bytes` counts them.

    PostgreSQL 15 reads events_type_id_idx in id order for `type = $3`,
    stopping at the page's limit, but not for `type = ANY($3)`: such a page
    reads and sorts every matching event of its range, a cost that grows
    with the feed (docs/scaling.md, "Query plans"). So one type has its own
    statement, and up to MERGED_TYPES types are read as one ordered scan
    per type (`_merged_types`); only more than that pay the `ANY` form.

    Memory is bounded in bytes, not rows: a page of small events holds
    thousands, a page of 1 MiB events one. Its columns are EVENT_COLUMNS.
    The running sum's frame is ROWS, not the default RANGE, which would
    look for peers of each id: 1M rows in 5,000-row pages read at about
    610k rows/s against 510k (a plain LIMIT reads about 765k)."""
    conditions = ["id > $1", "id < $2"]
    n = 3
    types_at = n
    if types is Types.ONE:
        conditions.append(f"type = ${n}")
        n += 1
    elif types is Types.MANY:
        conditions.append(f"type = ANY(${n}::text[])")
        n += 1
    elif types is Types.SOME:
        n += 1
    if with_subject:
        conditions.append(f"subject = ${n}")
        n += 1
    if partitions:
        conditions.append(
            f"{PARTITION_OF_SUBJECT.format(partitions=partitions)} = ANY(${n}::integer[])"
        )
        n += 1
    source = "events"
    if types is Types.SOME:
        source = _merged_types(conditions, types_at=types_at, limit_at=n)
    return f"""
SELECT {EVENT_COLUMNS}
FROM (
    SELECT id, type, source, subject, time, payload, payload_bytes,
           sum(payload_bytes
               + 4 * (char_length(type) + char_length(source) + char_length(subject))
               + 32) OVER (ORDER BY id ROWS UNBOUNDED PRECEDING) AS running,
           payload_bytes
               + 4 * (char_length(type) + char_length(source) + char_length(subject))
               + 32 AS own
    FROM {source}
    WHERE {" AND ".join(conditions)}
    ORDER BY id
    LIMIT ${n}
) AS page
WHERE running - own < ${n + 1}
ORDER BY id
"""


def _merged_types(conditions: list[str], *, types_at: int, limit_at: int) -> str:
    """The events matching `conditions` whose type is one of the array
    ${types_at}'s MERGED_TYPES elements, as a table named `events` in id
    order: one branch per element, each reading its type's events in id
    order up to the page's limit (${limit_at}), merged (Merge Append) so
    that only the rows the page keeps are read. PostgreSQL plans each
    branch for its own type (every execution is planned for its values:
    docs/scaling.md), so a rare type reads events_type_id_idx and a common
    one may walk the primary key, where it is dense; a NULL element makes
    its branch read nothing."""
    branches = [
        f"""(SELECT * FROM events
          WHERE {" AND ".join([f"type = (${types_at}::text[])[{i}]", *conditions])}
          ORDER BY id LIMIT ${limit_at})"""
        for i in range(1, MERGED_TYPES + 1)
    ]
    return "(\n        " + "\n        UNION ALL\n        ".join(branches) + "\n    ) AS events"
