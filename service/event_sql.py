"""The SQL of EventService; every value is a $n parameter."""

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

GET_EVENT = """
SELECT id, type, source, subject, time, payload::text AS payload
FROM events WHERE id = $1
"""
