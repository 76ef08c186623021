"""The peer: the OrderService a user would write without orderstream, on the
synchronous stack, with the same care.

    python -m bench.peer_server [--threads 16]

psycopg 3 with a psycopg_pool ConnectionPool (verified TLS, like the
service), a sync `grpc.server` with a thread pool, the generated stubs, the
service's own SQL text (service/orders/sql.py), server-side prepared
statements, binary results with timestamps decoded straight to integer
microseconds (the service's codec trick), and the service's validation,
body digest and row-to-message code. Serves GetOrder, CreateOrder and ListOrders (first page); reads
DATABASE_URL and PGSSLROOTCERT; logs one JSON "serving" line with the port.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import psycopg
from psycopg.adapt import Loader
from psycopg.pq import Format
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from orderstream.orders.v1 import order_service_pb2, order_service_pb2_grpc
from service.errors import ServiceError
from service.orders import sql as order_sql
from service.orders.convert import created_order, fill_order, order_from_row
from service.orders.rules import body_digest, checked_create, item_columns
from service.rpc.validation import require_positive_id

# PostgreSQL counts timestamps from 2000-01-01; protobuf from 1970-01-01.
_PG_EPOCH_OFFSET_US = 946_684_800_000_000
PAGE_SIZE = 50


class UnixMicros(Loader):
    """timestamptz (binary) -> microseconds since the Unix epoch."""

    format = Format.BINARY

    def load(self, data: Any) -> int:
        return int.from_bytes(data, "big", signed=True) + _PG_EPOCH_OFFSET_US


def psycopg_sql(sql: str) -> str:
    """The service's `$n` placeholders as psycopg's named ones; psycopg sends a
    repeated name as one parameter, so `$3` used twice stays `$3`."""
    return re.sub(r"\$(\d+)", r"%(p\1)s", sql)


def params(*values: Any) -> dict[str, Any]:
    return {f"p{n}": value for n, value in enumerate(values, start=1)}


GET_ORDER = psycopg_sql(order_sql.GET_ORDER)
CREATE_ORDER = psycopg_sql(order_sql.CREATE_ORDER)
LIST_ORDERS = psycopg_sql(order_sql.list_orders((), bounded=False))


def _configure(conn: psycopg.Connection) -> None:
    conn.adapters.register_loader("timestamptz", UnixMicros)


class PeerOrders(order_service_pb2_grpc.OrderServiceServicer):
    def __init__(self, pool: ConnectionPool) -> None:
        self._pool = pool

    def _query(self, sql: str, values: dict[str, Any]) -> list[dict[str, Any]]:
        with self._pool.connection() as conn:
            cursor = conn.cursor(binary=True, row_factory=dict_row)
            return cursor.execute(sql, values, prepare=True).fetchall()

    def GetOrder(self, request, context):  # type: ignore[no-untyped-def]
        try:
            require_positive_id("id", request.id)
        except ServiceError as exc:
            context.abort(exc.code, exc.message)
        rows = self._query(GET_ORDER, params(request.id))
        if not rows:
            context.abort(grpc.StatusCode.NOT_FOUND, f"order {request.id} not found")
        return order_from_row(rows[0])

    def CreateOrder(self, request, context):  # type: ignore[no-untyped-def]
        try:
            total = checked_create(request)
        except ServiceError as exc:
            context.abort(exc.code, exc.message)
        rows = self._query(
            CREATE_ORDER,
            params(
                request.request_id,
                body_digest(request),
                request.customer_id,
                request.currency,
                total,
                *item_columns(request.items),
            ),
        )
        if not rows:
            context.abort(grpc.StatusCode.ALREADY_EXISTS, "request_id already used")
        return created_order(request, total, rows[0])

    def ListOrders(self, request, context):  # type: ignore[no-untyped-def]
        page_size = request.page_size or PAGE_SIZE
        first_page = order_sql.id_range(0, order_sql.NO_END)
        rows = self._query(LIST_ORDERS, params(*first_page, page_size + 1))
        response = order_service_pb2.ListOrdersResponse()
        add_order = response.orders.add
        for row in rows[:page_size]:
            fill_order(add_order(), row)
        return response


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=16, help="gRPC threads = pool size")
    args = parser.parse_args()
    conninfo = psycopg.conninfo.make_conninfo(
        os.environ["DATABASE_URL"],
        sslmode="verify-full",
        sslrootcert=os.environ["PGSSLROOTCERT"],
        application_name="orderstream-peer",
    )
    pool = ConnectionPool(
        conninfo, min_size=args.threads, max_size=args.threads, configure=_configure, open=True
    )
    pool.wait()
    server = grpc.server(
        ThreadPoolExecutor(max_workers=args.threads), options=[("grpc.so_reuseport", 0)]
    )
    order_service_pb2_grpc.add_OrderServiceServicer_to_server(PeerOrders(pool), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(json.dumps({"message": "serving", "port": port}), file=sys.stderr, flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    server.stop(1).wait()
    pool.close()


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    main()
