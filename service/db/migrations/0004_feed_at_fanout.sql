-- The event feed under fan-out: the writers' announcements move to the
-- project's own advisory-lock key space, and payloads are bounded in bytes
-- by the table itself.

-- Writers now announce themselves with the two-key form of the advisory
-- lock: key 1 is orderstream's own class id for the feed, 1869833590
-- ("osev"), key 2 the low 32 bits of L (see events_safe_horizon below). The
-- single-key form, which Flyway, golang-migrate and many applications take,
-- and every other class id are no longer read as a writer of events; the
-- migrations' own lock (service/db/migrate.py) uses another class id.
CREATE OR REPLACE FUNCTION events_announce_writer() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock_shared(
        1869833590,
        (coalesce(pg_sequence_last_value('events_id_seq'), 0) & 4294967295)::bit(32)::integer
    );
    RETURN NULL;
END
$$;

-- As in 0002, H such that every id below H is final, now reading only the
-- feed's own locks. pg_locks shows key 2 as an unsigned 32-bit objid, L
-- modulo 2^32; the full L is recovered as the number within 2^31 of V (the
-- sequence's last value) with those low bits: a writer's L lies at most
-- 2^31 - 1 ids below V (no transaction stays open while two billion ids
-- are drawn), and may lie a little above V when it announced itself
-- between this function's two reads.
CREATE OR REPLACE FUNCTION events_safe_horizon() RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    last_drawn bigint;
    oldest_writer bigint;
BEGIN
    last_drawn := coalesce(pg_sequence_last_value('events_id_seq'), 0);
    SELECT min(last_drawn - (((last_drawn - l.objid::bigint) + 2147483648) & 4294967295)
               + 2147483648)
    INTO oldest_writer
    FROM pg_locks l
    WHERE l.locktype = 'advisory' AND l.objsubid = 2 AND l.classid = 1869833590
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database());
    RETURN least(last_drawn, coalesce(oldest_writer, last_drawn)) + 1;
END
$$;

-- The payload's size as PostgreSQL writes it back (what every reader
-- receives), stored once per row: the writers' limit below checks it, and
-- readers bound their fetches in bytes with it instead of writing every
-- payload out twice. Adding a stored generated column rewrites the table
-- once; the ACCESS EXCLUSIVE lock it takes also waits out any writer still
-- holding a lock of the old key space, so no announcement is missed.
ALTER TABLE events
    ADD COLUMN payload_bytes integer
        GENERATED ALWAYS AS (octet_length(payload::text)) STORED;

-- The written-out limit of every write path (service/events/payload.py),
-- enforced by the table too, so rows from any writer are bounded. NOT
-- VALID: a row already larger stays readable, and readers leave its payload
-- out rather than failing on it (docs/streams.md).
ALTER TABLE events
    ADD CONSTRAINT events_payload_size CHECK (payload_bytes <= 1048576) NOT VALID;
