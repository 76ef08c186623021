-- Idempotency records of client-streamed loads, and the bookkeeping that
-- lets readers of the event feed stop at a gap-free horizon.

CREATE TABLE uploads (
    upload_id      text PRIMARY KEY,
    event_count    bigint NOT NULL,
    first_event_id bigint NOT NULL,
    last_event_id  bigint NOT NULL,
    create_time    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE imports (
    import_id      text PRIMARY KEY,
    order_count    bigint NOT NULL,
    first_order_id bigint NOT NULL,
    last_order_id  bigint NOT NULL,
    create_time    timestamptz NOT NULL DEFAULT now()
);

-- Event ids are drawn before commit, so a lower id can become visible after
-- a higher one. Every statement that inserts events first announces itself:
-- it reads the sequence's last value L and holds a shared advisory lock keyed
-- L until its transaction ends; every id it then draws is above L. (A
-- statement-level BEFORE trigger fires before any row's default is computed,
-- for INSERT and COPY alike.)
CREATE FUNCTION events_announce_writer() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock_shared(coalesce(pg_sequence_last_value('events_id_seq'), 0));
    RETURN NULL;
END
$$;

CREATE TRIGGER events_announce_writer
    BEFORE INSERT ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_announce_writer();

-- Returns H such that every event id below H is final: visible to any
-- snapshot taken after this call returns, or never to be committed. It reads
-- V, the sequence's last value, and then the smallest announced L: a
-- transaction that drew an id <= V announced itself before drawing it, so at
-- the moment the locks are read it either still holds its lock (and H <= L <
-- its ids) or has ended (and a later snapshot sees its rows). Callers must
-- take their snapshot in a later statement. Only this trigger takes advisory
-- locks with a single bigint key in this database (objsubid = 1).
CREATE FUNCTION events_safe_horizon() RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    last_drawn bigint;
    oldest_writer bigint;
BEGIN
    last_drawn := coalesce(pg_sequence_last_value('events_id_seq'), 0);
    SELECT min((l.classid::bigint << 32) | l.objid::bigint) INTO oldest_writer
    FROM pg_locks l
    WHERE l.locktype = 'advisory' AND l.objsubid = 1
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database());
    RETURN least(last_drawn, coalesce(oldest_writer, last_drawn)) + 1;
END
$$;
