-- The per-event rules of PublishEvents, also enforced by the table, so that
-- UploadEvents can let PostgreSQL check rows as they stream through COPY
-- (service/events/uploads.py maps each constraint back to the offending field by
-- name: keep the names stable). payload's object check already exists
-- (events_payload_check); jsonb itself rejects bad JSON and \u0000, and
-- text columns reject NUL bytes.
--
-- NOT VALID: every existing row came through PublishEvents or the order
-- RPCs, which check the same rules, so skipping the validating scan keeps
-- this migration instant on a large table; new rows are checked either way.
ALTER TABLE events
    ADD CONSTRAINT events_type_required CHECK (type <> '') NOT VALID,
    ADD CONSTRAINT events_type_length CHECK (char_length(type) <= 256) NOT VALID,
    ADD CONSTRAINT events_source_required CHECK (source <> '') NOT VALID,
    ADD CONSTRAINT events_source_length CHECK (char_length(source) <= 1024) NOT VALID,
    ADD CONSTRAINT events_subject_length CHECK (char_length(subject) <= 1024) NOT VALID;
