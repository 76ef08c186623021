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

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable

import asyncpg
import grpc

from orderstream.orders.v1 import order_service_pb2
from service.db.runner import Database
from service.errors import ServiceError
from service.orders.rules import item_columns, order_total
from service.rpc.validation import Violations
from service.streams.limits import StreamSlots
from service.streams.loads import (
    NO_STATEMENT_TIMEOUT,
    LoadState,
    MessagePositions,
    RejectedRow,
    claim_key,
    confirm_end,
    key_mismatch,
    run_load,
)

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


def _response(row: asyncpg.Record) -> order_service_pb2.ImportOrdersResponse:
    return order_service_pb2.ImportOrdersResponse(
        order_count=row["order_count"],
        first_order_id=row["first_order_id"],
        last_order_id=row["last_order_id"],
    )


class _ImportRows:
    """The request stream as staging rows, and what went wrong with them."""

    def __init__(
        self,
        first: order_service_pb2.ImportOrdersRequest,
        rest: AsyncIterator[order_service_pb2.ImportOrdersRequest],
        context: grpc.aio.ServicerContext,
        *,
        import_id: str,
    ) -> None:
        self._first = first
        self._rest = rest
        self._context = context
        self._import_id = import_id
        self.positions = MessagePositions()
        self.state = LoadState()

    async def records(
        self,
    ) -> AsyncGenerator[tuple[str, str, int, list[str], list[int], list[int]]]:
        positions = self.positions
        request: order_service_pb2.ImportOrdersRequest | None = self._first
        while request is not None:
            message = positions.messages
            if request.import_id and request.import_id != self._import_id:
                raise self.state.reject(key_mismatch(f"messages[{message}].import_id"))
            positions.add(len(request.orders))
            for index, order in enumerate(request.orders):
                v = Violations()
                total = order_total(v, order)
                if v.count:
                    # Again, now naming the fields in full (rarely needed).
                    named = Violations()
                    order_total(named, order, f"messages[{message}].orders[{index}].")
                    try:
                        named.raise_if_any()
                    except ServiceError as error:
                        raise self.state.reject(error) from None
                yield (
                    order.customer_id,
                    order.currency,
                    total,
                    *item_columns(order.items),
                )
            request = await anext(self._rest, None)
        await confirm_end(self._context)


async def import_orders(
    db: Database,
    slots: StreamSlots,
    requests: AsyncIterator[order_service_pb2.ImportOrdersRequest],
    context: grpc.aio.ServicerContext,
    *,
    on_commit: Callable[[], None],
) -> order_service_pb2.ImportOrdersResponse:
    async def load(
        conn: asyncpg.Connection, first: order_service_pb2.ImportOrdersRequest, import_id: str
    ) -> tuple[order_service_pb2.ImportOrdersResponse, bool]:
        return await _load(conn, db, context, first, requests, import_id)

    return await run_load(
        db, slots, requests, context, key_name="import_id", load=load, on_commit=on_commit
    )


async def _load(
    conn: asyncpg.Connection,
    db: Database,
    context: grpc.aio.ServicerContext,
    first: order_service_pb2.ImportOrdersRequest,
    rest: AsyncIterator[order_service_pb2.ImportOrdersRequest],
    import_id: str,
) -> tuple[order_service_pb2.ImportOrdersResponse, bool]:
    """Runs inside the import's transaction; returns the response and whether
    any row was written."""
    claim, stored = await claim_key(
        conn, db, context, claim=_CLAIM, stored=_STORED, key_name="import_id", key=import_id
    )
    if claim is None:
        return _response(stored), False

    await conn.execute(_CREATE_STAGING, timeout=db.query_timeout(context))
    rows = _ImportRows(first, rest, context, import_id=import_id)
    try:
        async with contextlib.aclosing(rows.records()) as records:
            await conn.copy_records_to_table(
                _STAGING_TABLE,
                schema_name="pg_temp",
                columns=_COLUMNS,
                records=records,
                timeout=NO_STATEMENT_TIMEOUT,
            )
    except RejectedRow:
        assert rows.state.error is not None
        raise rows.state.error from None
    if rows.positions.rows == 0:
        return order_service_pb2.ImportOrdersResponse(), False
    # Bulk work that grows with the stream, bounded like the COPY.
    moved = await conn.fetchrow(_MOVE, import_id, timeout=NO_STATEMENT_TIMEOUT)
    return _response(moved), True
