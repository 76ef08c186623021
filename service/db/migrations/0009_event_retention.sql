-- Retention of the event feed (service/events/retention.py): the feed's
-- lower end, moved forward in the same transaction that deletes the events
-- below it, so a reader that looks at it after reading a page knows whether
-- that page could have lost events to retention.

CREATE TABLE feed_retention (
    only_row       boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    -- Every event with an id up to this one was deleted (0: none).
    truncated_upto bigint NOT NULL DEFAULT 0 CHECK (truncated_upto >= 0)
);
INSERT INTO feed_retention DEFAULT VALUES;

-- Retention holds back for the slowest durable consumer when told to.
CREATE INDEX consumers_position_idx ON consumers (position);
