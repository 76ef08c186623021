-- Orders, their items, and the global event feed.

CREATE TABLE orders (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- Idempotency key of CreateOrder and a digest of the request body, so a
    -- retry can be told apart from a reuse of the key with another body.
    -- NULL for orders that did not come through CreateOrder.
    request_id   text UNIQUE,
    request_hash bytea,
    customer_id  text NOT NULL,
    currency     text NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    status       text NOT NULL DEFAULT 'PENDING'
                 CHECK (status IN ('PENDING', 'PAID', 'SHIPPED', 'DELIVERED', 'CANCELLED')),
    total_cents  bigint NOT NULL CHECK (total_cents >= 0),
    version      bigint NOT NULL DEFAULT 1,
    create_time  timestamptz NOT NULL DEFAULT now(),
    update_time  timestamptz NOT NULL DEFAULT now()
);

-- ListOrders pages by id within each filter (keyset pagination).
CREATE INDEX orders_customer_id_id_idx ON orders (customer_id, id);
CREATE INDEX orders_status_id_idx ON orders (status, id);
CREATE INDEX orders_create_time_idx ON orders (create_time);

CREATE TABLE order_items (
    order_id         bigint NOT NULL REFERENCES orders (id),
    line_no          integer NOT NULL,
    sku              text NOT NULL,
    quantity         integer NOT NULL CHECK (quantity BETWEEN 1 AND 10000),
    unit_price_cents bigint NOT NULL CHECK (unit_price_cents >= 0),
    PRIMARY KEY (order_id, line_no)
);

CREATE TABLE events (
    id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- The writing transaction's id: ids are allocated before commit, so a
    -- reader needs this to know which positions may still fill in.
    tx_id   xid8 NOT NULL DEFAULT pg_current_xact_id(),
    type    text NOT NULL,
    source  text NOT NULL,
    subject text NOT NULL DEFAULT '',
    time    timestamptz NOT NULL,
    payload jsonb NOT NULL CHECK (jsonb_typeof(payload) = 'object')
);

CREATE INDEX events_type_id_idx ON events (type, id);
CREATE INDEX events_subject_id_idx ON events (subject, id) WHERE subject <> '';
