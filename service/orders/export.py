"""ExportOrders: every matching order, with its items, from one consistent
snapshot (a read-only REPEATABLE READ transaction), many orders per
message.

The orders are read in pages bounded in bytes (sql.export_page), each a
statement in that one transaction: an order may hold 1,000 items, so a
fetch of a fixed number of rows, as a cursor makes, would bound nothing.
One page is held at a time, and its rows become messages of at most
`batch_bytes` (an order larger than that alone in its own) written in C
(service/orders/wire.c), as ListOrders' pages are."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc

from orderstream.orders.v1 import order_service_pb2
from service.db.routing import Sent
from service.db.runner import Database
from service.orders import sql
from service.orders.convert import STATUS_VALUES
from service.orders.filters import order_filters, window_query
from service.orders.wire import encode_orders
from service.rpc.encoded import Encoded
from service.rpc.validation import Violations
from service.streams.limits import StreamSlots
from service.streams.packing import Messages
from service.streams.writes import stall_bound


async def export_orders(
    db: Database,
    request: order_service_pb2.ExportOrdersRequest,
    context: grpc.aio.ServicerContext,
    *,
    streams: StreamSlots,
    batch_bytes: int,
    write_stall_timeout: float,
    sent: Sent,
) -> None:
    v = Violations()
    filters = order_filters(request, v)
    v.raise_if_any()
    with streams.hold(), stall_bound(context, write_stall_timeout) as writes:
        conn = await db.acquire(context)
        try:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                after, end, limit = 0, sql.NO_END, sql.EXPORT_PAGE_ROWS
                if window := window_query(filters):
                    statement, window_args = window
                    ids = await conn.fetchrow(
                        statement, *window_args, timeout=db.query_timeout(context)
                    )
                    if ids is None or ids["after"] is None or ids["end_id"] is None:
                        return  # no order was created in the window
                    after, end = ids["after"], ids["end_id"]
                query = sql.export_page(tuple(filters), bounded=end != sql.NO_END)

                async def write(message: Encoded, last_id: int) -> None:
                    # The await is the back-pressure: a slow reader holds the
                    # export where it is, a stalled one ends it (READER_STALLED).
                    sent.anything = True
                    await writes.write(message, position=last_id)

                messages = Messages(_encode, write, batch_bytes)
                while rows := await conn.fetch(
                    query,
                    *filters.values(),
                    *sql.id_range(after, end),
                    limit,
                    sql.EXPORT_PAGE_BYTES,
                    timeout=db.query_timeout(context),
                ):
                    await messages.add(rows)
                    if (
                        len(rows) < limit
                        and sum(row["own"] for row in rows) < sql.EXPORT_PAGE_BYTES
                    ):
                        break  # neither limit cut the page: the orders are all read
                    after = rows[-1]["id"]
                    # Pages of large orders should not make PostgreSQL look
                    # at thousands of rows to return a few.
                    limit = min(sql.EXPORT_PAGE_ROWS, max(64, 2 * len(rows)))
                await messages.flush()
        finally:
            await db.release(conn)


def _encode(rows: Sequence[Any], start: int, used: int, budget: int) -> tuple[bytes, int]:
    return encode_orders(rows, start, used, budget, STATUS_VALUES)
