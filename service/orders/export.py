"""ExportOrders: every matching order, with its items, from one consistent
snapshot (a read-only REPEATABLE READ transaction) through a cursor, many
orders per message."""

from __future__ import annotations

import grpc

from orderstream.orders.v1 import order_service_pb2
from service.db.routing import Sent
from service.db.runner import Database
from service.orders import sql
from service.orders.convert import order_from_row
from service.orders.filters import order_filters
from service.rpc.validation import Violations
from service.streams.limits import StreamSlots
from service.streams.writes import write_within

FETCH_ROWS = 2000  # orders per cursor round trip


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
    with streams.hold():
        conn = await db.acquire(context)
        try:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                cursor = await db.cursor(
                    conn, context, sql.export_orders(tuple(filters)), *filters.values()
                )
                response = order_service_pb2.ExportOrdersResponse()
                size = 0
                while rows := await cursor.fetch(FETCH_ROWS, timeout=db.query_timeout(context)):
                    for row in rows:
                        order = order_from_row(row)
                        size += order.ByteSize()
                        response.orders.append(order)
                        if size >= batch_bytes:
                            # The await is the back-pressure: a slow reader
                            # holds the cursor where it is, a stalled one
                            # ends the export (READER_STALLED).
                            sent.anything = True
                            await write_within(
                                context, response, write_stall_timeout, position=order.id
                            )
                            response = order_service_pb2.ExportOrdersResponse()
                            size = 0
                if response.orders:
                    sent.anything = True
                    await write_within(
                        context, response, write_stall_timeout, position=response.orders[-1].id
                    )
        finally:
            await db.release(conn)
