-- Consumer groups (service/events/groups.py): a consumer's members, and
-- the acknowledged position of each of its partitions of the feed.

CREATE TABLE consumer_members (
    consumer      text NOT NULL REFERENCES consumers (name) ON DELETE CASCADE,
    member        text NOT NULL,
    -- Refreshed by the member's stream; a member not seen within the
    -- member timeout has left, and its partitions move.
    seen          timestamptz NOT NULL DEFAULT now(),
    -- The partitions its stream reads now, and where that stream restarted
    -- when they last changed: an acknowledgement applies to them, capped
    -- at `delivered`.
    partitions    integer[] NOT NULL DEFAULT '{}',
    delivered     bigint NOT NULL DEFAULT 0,
    -- The furthest it was ever sent: an acknowledgement past it is refused.
    max_delivered bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (consumer, member)
);

CREATE TABLE consumer_partitions (
    consumer  text NOT NULL REFERENCES consumers (name) ON DELETE CASCADE,
    partition integer NOT NULL CHECK (partition >= 0),
    -- Every event of this partition up to this id is processed.
    position  bigint NOT NULL CHECK (position >= 0),
    PRIMARY KEY (consumer, partition)
);
