"""ImportOrders: a client stream of orders loaded through COPY into staging
tables and moved into the real tables in one transaction.

One transaction per import: claim the import_id in `imports` (exactly as
UploadEvents claims its upload_id, see uploads.py: a concurrent import with
the same id waits, then returns the stored response), create a temporary
staging table that is dropped at commit or rollback, COPY the orders into
it straight from the request stream, then one statement moves them into
orders and order_items, writes one `order.created` event per order (the same
shape CreateOrder writes) and records the response in the claim.

A COPY feeds one table, so the staging table holds one row per order with
its items as three arrays; a second table for items would need a second
COPY, and so the whole stream buffered in between. Order ids are drawn from
the orders' own sequence as the rows arrive (the staging table's default),
so they follow the stream's order and tie items and events to their order.

Orders are checked in Python with CreateOrder's rules (rules.py), as
they arrive: a bad order ends the call at once with the field named
`messages[i].orders[j].items[k].quantity`, and the rollback leaves nothing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence

import asyncpg
import grpc

from orderstream.orders.v1 import order_pb2, order_service_pb2
from service.db.runner import Database
from service.errors import Reason
from service.orders.rules import item_columns, order_total
from service.rpc.validation import Violations
from service.streams.limits import StreamSlots, StreamTimeouts
from service.streams.loads import LoadSpec, run_load

_CLAIM = """
INSERT INTO imports (import_id, order_count, first_order_id, last_order_id)
VALUES ($1, 0, 0, 0)
ON CONFLICT (import_id) DO NOTHING
RETURNING true AS claimed
"""

_STORED = """
SELECT order_count, first_order_id, last_order_id FROM imports WHERE import_id = $1
"""

_STAGING_TABLE = "import_orders"

_CREATE_STAGING = f"""
CREATE TEMP TABLE {_STAGING_TABLE} (
    id          bigint NOT NULL DEFAULT nextval('orders_id_seq'),
    customer_id text NOT NULL,
    currency    text NOT NULL,
    total_cents bigint NOT NULL,
    skus        text[] NOT NULL,
    quantities  integer[] NOT NULL,
    unit_prices bigint[] NOT NULL
) ON COMMIT DROP
"""

_COLUMNS = ("customer_id", "currency", "total_cents", "skus", "quantities", "unit_prices")

# Items are numbered from 1 in the order given, events are inserted in order
# id order (so their ids ascend with the orders'), and the FK from items to
# orders is checked at the end of the statement, when all three CTEs ran.
_MOVE = f"""
WITH new_orders AS (
    INSERT INTO orders (id, customer_id, currency, total_cents)
    OVERRIDING SYSTEM VALUE
    SELECT id, customer_id, currency, total_cents FROM pg_temp.{_STAGING_TABLE}
    RETURNING id, customer_id, currency, total_cents, status, create_time
), new_items AS (
    INSERT INTO order_items (order_id, line_no, sku, quantity, unit_price_cents)
    SELECT staged.id, item.line_no, item.sku, item.quantity, item.unit_price_cents
    FROM pg_temp.{_STAGING_TABLE} AS staged,
         unnest(staged.skus, staged.quantities, staged.unit_prices)
             WITH ORDINALITY AS item (sku, quantity, unit_price_cents, line_no)
), new_events AS (
    INSERT INTO events (type, source, subject, time, payload)
    SELECT 'order.created', 'orderstream', 'orders/' || id, create_time,
           jsonb_build_object('order_id', id, 'customer_id', customer_id,
                              'currency', currency, 'total_cents', total_cents,
                              'status', status)
    FROM new_orders
    ORDER BY id
)
UPDATE imports
SET order_count = moved.order_count,
    first_order_id = moved.first_order_id,
    last_order_id = moved.last_order_id
FROM (
    SELECT count(*) AS order_count, min(id) AS first_order_id, max(id) AS last_order_id
    FROM new_orders
) AS moved
WHERE import_id = $1
RETURNING imports.order_count, imports.first_order_id, imports.last_order_id
"""


def _order_rows(
    orders: Sequence[order_pb2.Order], message: int, _claimed: asyncpg.Record
) -> list[tuple[str, str, int, list[str], list[int], list[int]]]:
    rows = []
    for index, order in enumerate(orders):
        v = Violations()
        total = order_total(v, order)
        if v.count:
            # Again, now naming the fields in full (rarely needed).
            named = Violations()
            order_total(named, order, f"messages[{message}].orders[{index}].")
            named.raise_if_any()
        rows.append((order.customer_id, order.currency, total, *item_columns(order.items)))
    return rows


_IMPORT: LoadSpec[order_service_pb2.ImportOrdersRequest, order_service_pb2.ImportOrdersResponse] = (
    LoadSpec(
        key_name="import_id",
        in_progress=Reason.IMPORT_IN_PROGRESS,
        items="orders",
        claim=_CLAIM,
        stored=_STORED,
        create_staging=_CREATE_STAGING,
        staging=_STAGING_TABLE,
        columns=_COLUMNS,
        rows=_order_rows,
        move=_MOVE,
        response=order_service_pb2.ImportOrdersResponse,
    )
)


async def import_orders(
    db: Database,
    slots: StreamSlots,
    timeouts: StreamTimeouts,
    requests: AsyncIterator[order_service_pb2.ImportOrdersRequest],
    context: grpc.aio.ServicerContext,
    *,
    on_commit: Callable[[], None],
) -> order_service_pb2.ImportOrdersResponse:
    return await run_load(_IMPORT, db, slots, timeouts, requests, context, on_commit=on_commit)
