-- A consumer group member's history page filters the events by its
-- subjects' partitions (service/events/sql.py, PARTITION_OF_SUBJECT with
-- groups.PARTITIONS = 16). Without statistics on that expression
-- PostgreSQL guesses it keeps 0.5% of the rows, and reads and sorts a whole
-- range rather than walking it in id order until the page is full; with
-- them, ANALYZE gives it each partition's real share (about a sixteenth).
-- The expression must stay exactly the one the statement uses.

CREATE STATISTICS events_subject_partition_stats
    ON ((('x' || left(md5(subject), 8))::bit(32)::bigint % 16)::integer)
    FROM events;
ANALYZE events;
