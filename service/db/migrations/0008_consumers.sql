-- Durable consumers: the position the service keeps for each named consumer
-- of the event feed (service/events/consumers.py).

CREATE TABLE consumers (
    name        text PRIMARY KEY,
    -- Acknowledged: every event up to this id is processed. Moves forward
    -- only with AckEvents (never backwards), or anywhere with ResetConsumer.
    position    bigint NOT NULL DEFAULT 0 CHECK (position >= 0),
    -- The furthest position a stream of this consumer was sent, written
    -- before the message that carries it: an acknowledgement past it is
    -- refused, from whichever replica it comes.
    delivered   bigint NOT NULL DEFAULT 0 CHECK (delivered >= 0),
    create_time timestamptz NOT NULL DEFAULT now(),
    ack_time    timestamptz
);
