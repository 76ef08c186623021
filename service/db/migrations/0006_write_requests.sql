-- Idempotency records of the unary writes that had none, and the indexes
-- that let every idempotency record be forgotten after the service's window
-- (service/db/expiry.py) in small batches, oldest first.

-- PublishEvents with a request_id: the body's digest, so a retry can be
-- told from a reuse of the key with another body, and the ids the first
-- call was given, in request order, to answer a retry with.
CREATE TABLE publish_requests (
    request_id   text PRIMARY KEY,
    request_hash bytea NOT NULL,
    event_ids    bigint[] NOT NULL,
    create_time  timestamptz NOT NULL DEFAULT now()
);

-- UpdateOrderStatus with a request_id: the change it made, so a retry of a
-- change that took effect is answered with the order instead of refused.
CREATE TABLE status_requests (
    request_id   text PRIMARY KEY,
    request_hash bytea NOT NULL,
    order_id     bigint NOT NULL REFERENCES orders (id),
    create_time  timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX publish_requests_create_time_idx ON publish_requests (create_time);
CREATE INDEX status_requests_create_time_idx ON status_requests (create_time);
CREATE INDEX uploads_create_time_idx ON uploads (create_time);
CREATE INDEX imports_create_time_idx ON imports (create_time);
-- Only orders whose request_id is still remembered: the index shrinks as
-- keys expire instead of growing with every order ever created.
CREATE INDEX orders_remembered_request_idx ON orders (create_time)
    WHERE request_id IS NOT NULL;
