"""The SQL of EventService; every value from a request is a $n parameter
(the payload limit, a constant of the code, is written in)."""

from service.events.payload import MAX_PAYLOAD_BYTES

# Rows are inserted in request order, and ids are drawn in insertion order,
# so the ascending ids returned map one to one onto the request's events.
PUBLISH_EVENTS = """
INSERT INTO events (type, source, subject, time, payload)
SELECT e.type, e.source, e.subject, coalesce(e.time, now()), e.payload::jsonb
FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::text[])
         WITH ORDINALITY AS e (type, source, subject, time, payload, n)
ORDER BY e.n
RETURNING id
"""

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

GET_EVENT = f"""
SELECT {EVENT_COLUMNS}
FROM events WHERE id = $1
"""

# See migrations/0002_streaming.sql: every id below the result is final. Run
# it as its own statement, before the snapshot that reads the range.
SAFE_HORIZON = "SELECT events_safe_horizon()"


def events_in_range(*, with_types: bool, with_subject: bool, limited: bool) -> str:
    """Events (EVENT_COLUMNS) with $1 < id < $2, ascending, then optional
    filters: type = ANY($3), subject = $n, and LIMIT $n, in that order."""
    conditions = ["id > $1", "id < $2"]
    n = 3
    if with_types:
        conditions.append(f"type = ANY(${n}::text[])")
        n += 1
    if with_subject:
        conditions.append(f"subject = ${n}")
        n += 1
    limit = f"LIMIT ${n}" if limited else ""
    return f"""
SELECT {EVENT_COLUMNS}
FROM events
WHERE {" AND ".join(conditions)}
ORDER BY id
{limit}
"""
