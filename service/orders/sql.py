"""The SQL of OrderService. Every value is a $n parameter; the only SQL
composed at run time is ListOrders' WHERE clause, assembled from the fixed
fragments below according to which filters are set (never from values), so
that each combination gets its own plan that can use its index."""

from __future__ import annotations

# Columns of an order plus its items as three parallel arrays, in line order.
_ORDER_COLUMNS = """
    o.id, o.customer_id, o.currency, o.status, o.total_cents, o.version,
    o.create_time, o.update_time, i.skus, i.quantities, i.prices
"""
_ITEMS_OF_O = """
    CROSS JOIN LATERAL (
        SELECT array_agg(sku ORDER BY line_no) AS skus,
               array_agg(quantity ORDER BY line_no) AS quantities,
               array_agg(unit_price_cents ORDER BY line_no) AS prices
        FROM order_items WHERE order_id = o.id
    ) i
"""

# One statement, hence one transaction: the order, its items and its
# order.created event. On a request_id conflict nothing is written and no
# row is returned (ON CONFLICT waits for a concurrent insert of the same key
# to commit or roll back, so two identical calls cannot both insert).
CREATE_ORDER = """
WITH new_order AS (
    INSERT INTO orders (request_id, request_hash, customer_id, currency, total_cents)
    VALUES ($1, $2, $3, $4, $5)
    ON CONFLICT (request_id) DO NOTHING
    RETURNING id, status, version, create_time, update_time
), new_items AS (
    INSERT INTO order_items (order_id, line_no, sku, quantity, unit_price_cents)
    SELECT new_order.id, item.line_no, item.sku, item.quantity, item.unit_price_cents
    FROM new_order,
         unnest($6::text[], $7::integer[], $8::bigint[])
             WITH ORDINALITY AS item (sku, quantity, unit_price_cents, line_no)
), new_event AS (
    INSERT INTO events (type, source, subject, time, payload)
    SELECT 'order.created', 'orderstream', 'orders/' || id, create_time,
           jsonb_build_object('order_id', id, 'customer_id', $3::text, 'currency', $4::text,
                              'total_cents', $5::bigint, 'status', status)
    FROM new_order
)
SELECT id, status, version, create_time, update_time FROM new_order
"""

ORDER_BY_REQUEST_ID = f"""
SELECT {_ORDER_COLUMNS}, o.request_hash
FROM orders o {_ITEMS_OF_O}
WHERE o.request_id = $1
"""

GET_ORDER = f"""
SELECT {_ORDER_COLUMNS}
FROM orders o {_ITEMS_OF_O}
WHERE o.id = $1
"""

# $1 id, $2 new status, $3 statuses it may come from, $4 expected version (0:
# any), $5 the caller's request_id ('' for none) and $6 the body's digest.
# Locks the row first so the event records the status it left. A change
# that took effect records its request_id with a plain INSERT: a key used
# before fails the statement on status_requests_pkey, so nothing is written.
UPDATE_ORDER_STATUS = f"""
WITH previous AS (
    SELECT id, status FROM orders WHERE id = $1 FOR UPDATE
), updated AS (
    UPDATE orders AS o
    SET status = $2, version = o.version + 1, update_time = now()
    FROM previous
    WHERE o.id = previous.id
      AND previous.status = ANY($3::text[])
      AND ($4::bigint = 0 OR o.version = $4::bigint)
    RETURNING o.*, previous.status AS previous_status
), event AS (
    INSERT INTO events (type, source, subject, time, payload)
    SELECT 'order.status_changed', 'orderstream', 'orders/' || id, update_time,
           jsonb_build_object('order_id', id, 'status', status,
                              'previous_status', previous_status, 'version', version)
    FROM updated
), record AS (
    INSERT INTO status_requests (request_id, request_hash, order_id)
    SELECT $5, $6, id FROM updated WHERE $5::text <> ''
)
SELECT {_ORDER_COLUMNS}
FROM updated o {_ITEMS_OF_O}
"""

ORDER_STATE = "SELECT status, version FROM orders WHERE id = $1"

STATUS_REQUEST = "SELECT request_hash, order_id FROM status_requests WHERE request_id = $1"

# ListOrders: filter name -> fragment with a placeholder slot.
LIST_FILTERS = {
    "customer_id": "o.customer_id = ${}",
    "status": "o.status = ${}",
    "created_after": "o.create_time >= ${}",
    "created_before": "o.create_time < ${}",
}


# How many orders, from the listing's start in id order, `window_start`
# looks at before it reads the window from the creation-time index instead.
WINDOW_HEAD_ROWS = 10_000


def window_start(*, with_before: bool) -> str:
    """The smallest id of an order created at or after $1 (and before $2,
    with `with_before`), or NULL when there is none: where a listing
    filtered by creation time starts walking the ids.

    Creation times rise with the id, so PostgreSQL, which takes the two for
    independent, expects a recent window's orders anywhere in id order and
    walks the primary key from the first order, filtering, to reach them: a
    walk over every older order, which grows with the table. Starting the
    listing at the window's first id bounds that walk. It is found exactly,
    whichever is cheaper of two ways: among the first WINDOW_HEAD_ROWS
    orders in id order (an old or wide window starts there), else from the
    window's own entries in orders_create_time_id_idx (a recent window is
    small). `id + 0` keeps PostgreSQL from turning that min() back into a
    walk of the primary key; COALESCE runs the second subquery only when the
    first found nothing."""
    window = "create_time >= $1" + (" AND create_time < $2" if with_before else "")
    head = 3 if with_before else 2
    return f"""
SELECT coalesce(
    (SELECT id
     FROM (SELECT id, create_time FROM orders ORDER BY id LIMIT ${head}) AS first_orders
     WHERE {window}
     ORDER BY id
     LIMIT 1),
    (SELECT min(id + 0) FROM orders WHERE {window})
)
"""


def _filtered_orders(filters: tuple[str, ...], extra: list[str]) -> str:
    conditions = [LIST_FILTERS[name].format(n) for n, name in enumerate(filters, start=1)]
    return f"""
SELECT {_ORDER_COLUMNS}
FROM orders o {_ITEMS_OF_O}
WHERE {" AND ".join(conditions + extra) or "true"}
ORDER BY o.id
"""


def list_orders(filters: tuple[str, ...]) -> str:
    """SELECT for the given set filters, in LIST_FILTERS order; the last two
    parameters are always the id to start after and the row limit."""
    after, limit = len(filters) + 1, len(filters) + 2
    return _filtered_orders(filters, [f"o.id > ${after}"]) + f"LIMIT ${limit}\n"


# The most orders and bytes (as `export_page` counts them: characters as
# four bytes, UTF-8's most) one page of an export may hold.
EXPORT_PAGE_ROWS = 2000
EXPORT_PAGE_BYTES = 1 << 20


def export_page(filters: tuple[str, ...]) -> str:
    """The next orders matching the set filters after the id in the
    parameter after theirs, ascending, at most the row limit in the next
    one and, after the first order, no more than the bytes in the last.
    Orders hold up to 1,000 items, so a page is bounded in bytes, not
    rows."""
    after = len(filters) + 1
    conditions = [LIST_FILTERS[name].format(n) for n, name in enumerate(filters, start=1)]
    conditions.append(f"o.id > ${after}")
    return f"""
SELECT id, customer_id, currency, status, total_cents, version,
       create_time, update_time, skus, quantities, prices, own
FROM (
    SELECT {_ORDER_COLUMNS},
           sum(size.own) OVER (ORDER BY o.id ROWS UNBOUNDED PRECEDING) AS running, size.own
    FROM orders o {_ITEMS_OF_O}
    CROSS JOIN LATERAL (
        SELECT 4 * char_length(o.customer_id) + 96
               + coalesce((SELECT sum(4 * char_length(s) + 32) FROM unnest(i.skus) AS s), 0)
               AS own
    ) size
    WHERE {" AND ".join(conditions)}
    ORDER BY o.id
    LIMIT ${after + 1}
) AS page
WHERE running - own < ${after + 2}
ORDER BY id
"""
