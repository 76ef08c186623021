-- The unary writes as functions, each planned once per session instead of
-- on every call.
--
-- Pooled sessions run with plan_cache_mode = force_custom_plan, so a
-- selective read is planned for its own values (service/db/pool.py says
-- why). A write's plan cannot depend on its values (it inserts what it is
-- given; its one lookup is by a unique key), yet under that setting each
-- execution was planned again: for CreateOrder's statement, about a third
-- of its throughput on the benchmark machine (docs/benchmarks.md). PL/pgSQL
-- keeps its statements' plans for the session, and a function's own SET
-- puts the usual choice back for them alone: a generic plan from the sixth
-- call on.
--
-- Each body is the statement the service sent before, with the function's
-- parameters in the same $n places (their casts are now the parameters'
-- declared types); a call is one statement, hence one transaction, as
-- before, and a constraint it breaks is reported by name, as before.
-- #variable_conflict use_column: inside the body, a name such as `id` is
-- the column, not the function's result column.

CREATE FUNCTION orders_create(
    text, bytea, text, text, bigint, text[], integer[], bigint[]
) RETURNS TABLE (
    id bigint, status text, version bigint, create_time timestamptz, update_time timestamptz
)
LANGUAGE plpgsql SET plan_cache_mode = auto AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH new_order AS (
        INSERT INTO orders (request_id, request_hash, customer_id, currency, total_cents)
        VALUES ($1, $2, $3, $4, $5)
        ON CONFLICT (request_id) DO NOTHING
        RETURNING id, status, version, create_time, update_time
    ), new_items AS (
        INSERT INTO order_items (order_id, line_no, sku, quantity, unit_price_cents)
        SELECT new_order.id, item.line_no, item.sku, item.quantity, item.unit_price_cents
        FROM new_order,
             unnest($6, $7, $8)
                 WITH ORDINALITY AS item (sku, quantity, unit_price_cents, line_no)
    ), new_event AS (
        INSERT INTO events (type, source, subject, time, payload)
        SELECT 'order.created', 'orderstream', 'orders/' || id, create_time,
               jsonb_build_object('order_id', id, 'customer_id', $3, 'currency', $4,
                                  'total_cents', $5, 'status', status)
        FROM new_order
    )
    SELECT id, status, version, create_time, update_time FROM new_order;
END
$$;

CREATE FUNCTION orders_update_status(
    bigint, text, text[], bigint, text, bytea
) RETURNS TABLE (
    id bigint, customer_id text, currency text, status text, total_cents bigint,
    version bigint, create_time timestamptz, update_time timestamptz,
    skus text[], quantities integer[], prices bigint[]
)
LANGUAGE plpgsql SET plan_cache_mode = auto AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH previous AS (
        SELECT id, status FROM orders WHERE id = $1 FOR UPDATE
    ), updated AS (
        UPDATE orders AS o
        SET status = $2, version = o.version + 1, update_time = now()
        FROM previous
        WHERE o.id = previous.id
          AND previous.status = ANY($3)
          AND ($4 = 0 OR o.version = $4)
        RETURNING o.*, previous.status AS previous_status
    ), event AS (
        INSERT INTO events (type, source, subject, time, payload)
        SELECT 'order.status_changed', 'orderstream', 'orders/' || id, update_time,
               jsonb_build_object('order_id', id, 'status', status,
                                  'previous_status', previous_status, 'version', version)
        FROM updated
    ), record AS (
        INSERT INTO status_requests (request_id, request_hash, order_id)
        SELECT $5, $6, id FROM updated WHERE $5 <> ''
    )
    SELECT o.id, o.customer_id, o.currency, o.status, o.total_cents, o.version,
           o.create_time, o.update_time, i.skus, i.quantities, i.prices
    FROM updated o
        CROSS JOIN LATERAL (
            SELECT array_agg(sku ORDER BY line_no) AS skus,
                   array_agg(quantity ORDER BY line_no) AS quantities,
                   array_agg(unit_price_cents ORDER BY line_no) AS prices
            FROM order_items WHERE order_id = o.id
        ) i;
END
$$;

-- Rows are inserted in request order, and ids are drawn in insertion
-- order, so the ascending ids returned map one to one onto the events.
CREATE FUNCTION events_publish(
    text[], text[], text[], timestamptz[], text[]
) RETURNS TABLE (id bigint)
LANGUAGE plpgsql SET plan_cache_mode = auto AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    INSERT INTO events (type, source, subject, time, payload)
    SELECT e.type, e.source, e.subject, coalesce(e.time, now()), e.payload::jsonb
    FROM unnest($1, $2, $3, $4, $5) WITH ORDINALITY AS e (type, source, subject, time, payload, n)
    ORDER BY e.n
    RETURNING id;
END
$$;

-- events_publish with a request_id ($6) and the body's digest ($7): the
-- events and the record of the ids they were given. The record is a plain
-- INSERT, not ON CONFLICT: a key already committed fails the call on
-- publish_requests_pkey (after waiting for a concurrent insert of the same
-- key to commit or roll back), so nothing of a retry is written.
CREATE FUNCTION events_publish_keyed(
    text[], text[], text[], timestamptz[], text[], text, bytea
) RETURNS TABLE (id bigint)
LANGUAGE plpgsql SET plan_cache_mode = auto AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH new_events AS (
        SELECT id FROM events_publish($1, $2, $3, $4, $5)
    ), record AS (
        INSERT INTO publish_requests (request_id, request_hash, event_ids)
        SELECT $6, $7, array_agg(id ORDER BY id) FROM new_events
        RETURNING event_ids
    )
    SELECT unnest(event_ids) FROM record;
END
$$;
