"""The SQL of OrderService. Every value is a $n parameter; the only SQL
composed at run time is ListOrders' WHERE clause, assembled from the fixed
fragments below according to which filters are set (never from values), so
that each combination gets its own plan that can use its index."""

from __future__ import annotations

import enum

# An order's own columns (also what a listing's subquery picks before the
# items are joined), then with its items as three parallel arrays, in line
# order.
_OWN_COLUMNS = """
    o.id, o.customer_id, o.currency, o.status, o.total_cents, o.version,
    o.create_time, o.update_time"""
_ORDER_COLUMNS = f"{_OWN_COLUMNS}, i.skus, i.quantities, i.prices\n"
_ITEMS_OF_O = """
    CROSS JOIN LATERAL (
        SELECT array_agg(sku ORDER BY line_no) AS skus,
               array_agg(quantity ORDER BY line_no) AS quantities,
               array_agg(unit_price_cents ORDER BY line_no) AS prices
        FROM order_items WHERE order_id = o.id
    ) i
"""

# The order, its items and its order.created event, in one statement, hence
# one transaction: orders_create (migrations/0012_write_functions.sql, which
# says why the writes are functions). On a request_id conflict nothing is
# written and no row is returned (ON CONFLICT waits for a concurrent insert of
# the same key to commit or roll back, so two identical calls cannot both
# insert). $1 request_id, $2 the body's digest, $3 customer_id, $4 currency,
# $5 total_cents, $6-$8 the items' skus, quantities and unit prices. The
# service writes through CREATE_ORDERS, whose function calls orders_create
# for each order; this statement, one create on its own, is what the
# benchmark's peer (bench/peer_server.py) sends for every call.
CREATE_ORDER = "SELECT * FROM orders_create($1, $2, $3, $4, $5, $6, $7, $8)"

# Several CreateOrder calls' orders in one statement, each as CREATE_ORDER
# under its own subtransaction (service/orders/create_batches.py): a row
# per order, in order, with `refused` its SQLSTATE if the database refused
# it. $1-$5 one array per order column, $6 each order's item count, $7-$9
# all the items' skus, quantities and unit prices.
CREATE_ORDERS = "SELECT * FROM orders_create_batch($1, $2, $3, $4, $5, $6, $7, $8, $9)"

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

# GetOrder: the orders of the calls that arrive together, in one statement
# (service/db/point_reads.py); $1 their ids.
GET_ORDERS = f"""
SELECT {_ORDER_COLUMNS}
FROM orders o {_ITEMS_OF_O}
WHERE o.id = ANY($1::bigint[])
"""

# orders_update_status (migrations/0012_write_functions.sql): $1 id, $2 new
# status, $3 statuses it may come from, $4 expected version (0: any), $5 the
# caller's request_id ('' for none) and $6 the body's digest. Locks the row
# first so the event records the status it left. A change that took effect
# records its request_id with a plain INSERT: a key used before fails the
# statement on status_requests_pkey, so nothing is written. The order's
# columns come back as ORDER_BY_REQUEST_ID's, without request_hash.
UPDATE_ORDER_STATUS = "SELECT * FROM orders_update_status($1, $2, $3, $4, $5, $6)"

ORDER_STATE = "SELECT status, version FROM orders WHERE id = $1"

STATUS_REQUEST = "SELECT request_hash, order_id FROM status_requests WHERE request_id = $1"

# ListOrders: filter name -> fragment with a placeholder slot. The creation
# times are written as `(...) IS TRUE`, which no index serves: a listing by
# creation time walks the ids between its window's first and last
# (`window_ids`), and its times only filter. Left indexable, they let
# PostgreSQL, which takes times and ids for independent and so expects a
# handful of the window's orders after a page's start, read the rest of the
# window from orders_create_time_id_idx and sort it, on every page.
LIST_FILTERS = {
    "customer_id": "o.customer_id = ${}",
    "status": "o.status = ${}",
    "created_after": "(o.create_time >= ${}) IS TRUE",
    "created_before": "(o.create_time < ${}) IS TRUE",
}


# How many orders, from either end of the table in id order, `window_ids`
# looks at before it reads a window from the creation-time index instead.
WINDOW_EDGE_ROWS = 10_000
# The end of a listing whose ids are not bounded above: the largest bigint.
NO_END = 2**63 - 1


class Window(enum.Enum):
    """Which bounds a creation-time window has: its filters, in order."""

    AFTER = ("created_after",)
    BEFORE = ("created_before",)
    BOTH = ("created_after", "created_before")


def window_ids(window: Window) -> str:
    """Where a listing of the orders created in `window` (at or after
    created_after, before created_before, in parameters in that order)
    walks the ids: one row, the id to start after and the last id to read,
    with WINDOW_EDGE_ROWS in the last parameter. A NULL in either means no
    order was created in the window. Without created_after it starts after
    0; without created_before, or with a bound still ahead of the
    database's clock (orders may yet be created before it), it reads to
    NO_END.

    Creation times rise with the id, so PostgreSQL, which takes the two for
    independent, expects a window's orders anywhere in id order: it walks
    the primary key from the first order to reach a recent window, and
    after an old one on to the last order before it can tell that no more
    follow. Both walks grow with the table; bounding the listing by the
    window's first and last ids bounds them. Each is found exactly,
    whichever is cheaper of two ways: among the WINDOW_EDGE_ROWS orders at
    that end of the table in id order (a window that reaches that end, or
    near it), else from the window's own entries in
    orders_create_time_id_idx, without the table. `id + 0` keeps
    PostgreSQL from turning min() and max() back into walks of the primary
    key; COALESCE and CASE run a subquery only when its answer is needed."""
    with_after, with_before = window is not Window.BEFORE, window is not Window.AFTER
    edge = len(window.value) + 1
    conditions = {
        "created_after": "create_time >= $1",
        "created_before": f"create_time < ${edge - 1}",
    }
    matches = " AND ".join(conditions[name] for name in window.value)

    def edge_or_index(direction: str, aggregate: str) -> str:
        return f"""coalesce(
        (SELECT id
         FROM (SELECT id, create_time FROM orders ORDER BY id {direction} LIMIT ${edge}) AS edge
         WHERE {matches}
         ORDER BY id {direction}
         LIMIT 1),
        (SELECT {aggregate}(id + 0) FROM orders WHERE {matches}))"""

    after = f"{edge_or_index('ASC', 'min')} - 1" if with_after else "0"
    end = f"{NO_END}"
    if with_before:
        end = (
            f"CASE WHEN ${edge - 1} <= now() THEN {edge_or_index('DESC', 'max')} ELSE {NO_END} END"
        )
    return f"""
SELECT {after} AS after, {end} AS end_id
"""


def _listing_conditions(filters: tuple[str, ...], bounded: bool) -> tuple[list[str], int]:
    """A listing's conditions: the set filters, in LIST_FILTERS order, then
    the id to start after and, when `bounded`, the last id to read; and the
    number of the parameter after theirs.

    Unbounded listings (the last id is NO_END: all but creation-time
    windows) leave the last id out rather than pass NO_END. Without column
    statistics (a table that is new, or grew since autovacuum last analysed
    it), PostgreSQL takes any two-sided range to match 0.5% of the rows; for
    a first page (0 to NO_END) it then read and sorted every order instead
    of walking the primary key to the 51st (2.5 ms of its CPU at 9,200
    orders, against 0.35 ms). One-sided, it expects a third of the table,
    and the walk wins."""
    conditions = [LIST_FILTERS[name].format(n) for n, name in enumerate(filters, start=1)]
    after = len(filters) + 1
    conditions.append(f"o.id > ${after}")
    if not bounded:
        return conditions, after + 1
    conditions.append(f"o.id <= ${after + 1}")
    return conditions, after + 2


def id_range(after: int, end: int) -> list[int]:
    """A listing's id parameters, built with bounded=(end != NO_END)."""
    return [after] if end == NO_END else [after, end]


def list_orders(filters: tuple[str, ...], bounded: bool) -> str:
    """SELECT for the given set filters (`_listing_conditions`: their values,
    then `id_range`), then the row limit.

    The page's orders are chosen first, and only their items aggregated.
    Planned for its values, a first page of a small table can be read whole
    and sorted; joined to the items as one query, that plan aggregated the
    items of every order in the table to return 51 of them (about 1 ms of
    PostgreSQL's CPU a call at 200 orders, against 0.3 ms for this
    shape)."""
    conditions, limit = _listing_conditions(filters, bounded)
    return f"""
SELECT {_ORDER_COLUMNS}
FROM (
    SELECT {_OWN_COLUMNS}
    FROM orders o
    WHERE {" AND ".join(conditions)}
    ORDER BY o.id
    LIMIT ${limit}
) o {_ITEMS_OF_O}
ORDER BY o.id
"""


# The most orders and bytes (as `export_page` counts them: characters as
# four bytes, UTF-8's most) one page of an export may hold.
EXPORT_PAGE_ROWS = 2000
EXPORT_PAGE_BYTES = 1 << 20


def export_page(filters: tuple[str, ...], bounded: bool) -> str:
    """The next orders matching the set filters (`_listing_conditions`: their
    values, then `id_range`), ascending, at most the row limit in the next
    parameter and, after the first order, no more than the bytes in the last.
    Orders hold up to 1,000 items, so a page is bounded in bytes, not rows."""
    conditions, limit = _listing_conditions(filters, bounded)
    max_bytes = limit + 1
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
    LIMIT ${limit}
) AS page
WHERE running - own < ${max_bytes}
ORDER BY id
"""
