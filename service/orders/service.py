"""OrderService: create, get, list and update orders."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Callable

import asyncpg
import grpc

from orderstream.orders.v1 import order_pb2, order_service_pb2, order_service_pb2_grpc
from service.db.point_reads import PointReads
from service.db.routing import ReadRouter, Sent
from service.db.runner import Database
from service.errors import (
    FieldViolation,
    Reason,
    ServiceError,
    invalid_argument,
    order_not_found,
)
from service.orders import sql
from service.orders.convert import STATUS_NAMES, STATUS_VALUES, created_order, order_from_row
from service.orders.create_batches import CreateBatches, NewOrder
from service.orders.export import export_orders
from service.orders.filters import order_filters, window_query
from service.orders.imports import import_orders
from service.orders.page_token import InvalidPageToken, PageTokens
from service.orders.rules import body_digest, checked_create, item_columns
from service.orders.wire import encode_order, encode_page
from service.rpc.boundary import rpc
from service.rpc.encoded import Encoded
from service.rpc.request_keys import body_digest as request_digest
from service.rpc.request_keys import request_id_reused
from service.rpc.validation import MAX_ID_LENGTH, Violations, require_positive_id
from service.streams.limits import StreamSlots, StreamTimeouts

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000

# Target status -> the statuses an order may move to it from.
ALLOWED_FROM: dict[int, tuple[str, ...]] = {
    order_pb2.ORDER_STATUS_PENDING: (),
    order_pb2.ORDER_STATUS_PAID: ("PENDING",),
    order_pb2.ORDER_STATUS_SHIPPED: ("PAID",),
    order_pb2.ORDER_STATUS_DELIVERED: ("SHIPPED",),
    order_pb2.ORDER_STATUS_CANCELLED: ("PENDING", "PAID"),
}


def _checked_status(field: str, status: int, *, allow_unspecified: bool) -> None:
    if status in STATUS_NAMES or (
        allow_unspecified and status == order_pb2.ORDER_STATUS_UNSPECIFIED
    ):
        return
    raise invalid_argument([FieldViolation(field, f"not a valid OrderStatus: {status}")])


class OrderService(order_service_pb2_grpc.OrderServiceServicer):
    def __init__(
        self,
        db: Database,
        *,
        reads: ReadRouter,
        page_tokens: PageTokens,
        streams: StreamSlots,
        timeouts: StreamTimeouts,
        batch_bytes: int,
        announce: Callable[[], None],
    ) -> None:
        """`announce` tells the event feed that events were committed (every
        order change writes one); `batch_bytes` bounds an export message."""
        self._db = db
        # ListOrders and ExportOrders may be served by the read replica
        # (service/db/routing.py says why these and no others).
        self._reads = reads
        self._page_tokens = page_tokens
        self._streams = streams
        self._timeouts = timeouts
        self._announce = announce
        self._batch_bytes = batch_bytes
        self._creates = CreateBatches(db, on_commit=announce)
        # GetOrder calls that arrive together share a statement.
        self._orders_by_id = PointReads(db, sql.GET_ORDERS)

    @rpc
    async def CreateOrder(
        self, request: order_service_pb2.CreateOrderRequest, context: grpc.aio.ServicerContext
    ) -> order_pb2.Order:
        total = checked_create(request)
        digest = body_digest(request)
        row = await self._creates.create(
            context,
            NewOrder(
                request.request_id,
                digest,
                request.customer_id,
                request.currency,
                total,
                *item_columns(request.items),
            ),
        )
        if row["id"] is None:
            return await self._replay(request.request_id, digest, context)
        return created_order(request, total, row)

    async def _replay(
        self, request_id: str, digest: bytes, context: grpc.aio.ServicerContext
    ) -> order_pb2.Order:
        """Answers a repeated request_id: the same order, or ALREADY_EXISTS."""
        row = await self._db.fetchrow(context, sql.ORDER_BY_REQUEST_ID, request_id)
        if row is None:
            # The insert conflicted with a committed order that is gone now:
            # deleted in between (the service never deletes orders; an
            # operator's clean-up might). A retry inserts it anew.
            raise ServiceError(
                grpc.StatusCode.ABORTED,
                Reason.CONCURRENT_REQUEST,
                "a concurrent request with this request_id did not complete; retry",
                retry_after=0.05,
            )
        if row["request_hash"] != digest:
            raise ServiceError(
                grpc.StatusCode.ALREADY_EXISTS,
                Reason.REQUEST_ID_REUSED,
                f"request_id was already used for order {row['id']} with a different body",
                metadata={"order_id": str(row["id"])},
            )
        return order_from_row(row)

    @rpc
    async def GetOrder(  # type: ignore[override]  # returns the order's bytes
        self, request: order_service_pb2.GetOrderRequest, context: grpc.aio.ServicerContext
    ) -> Encoded:
        require_positive_id("id", request.id)
        row = await self._orders_by_id.get(context, request.id, order_not_found)
        return Encoded(encode_order(row, STATUS_VALUES), 1)

    @rpc
    async def ListOrders(  # type: ignore[override]  # returns the response's bytes
        self, request: order_service_pb2.ListOrdersRequest, context: grpc.aio.ServicerContext
    ) -> Encoded:
        v = Violations()
        filters = order_filters(request, v)
        if not 0 <= request.page_size <= MAX_PAGE_SIZE:
            v.add("page_size", f"must be 0 (default {DEFAULT_PAGE_SIZE}) to {MAX_PAGE_SIZE}")
        v.raise_if_any()

        fingerprint = _filter_fingerprint(request)
        after_id, end_id = 0, sql.NO_END
        if request.page_token:
            try:
                after_id, end_id = self._page_tokens.decode(request.page_token, fingerprint)
            except InvalidPageToken as exc:
                raise invalid_argument([FieldViolation("page_token", str(exc))]) from None
        page_size = request.page_size or DEFAULT_PAGE_SIZE
        # The first page finds the creation-time window's ids; the token
        # carries its end to the pages that follow.
        window = None if request.page_token else window_query(filters)

        async def page(db: Database, _sent: Sent) -> list[asyncpg.Record]:
            nonlocal after_id, end_id
            if window is not None:
                statement, window_args = window
                ids = await db.fetchrow(context, statement, *window_args)
                if ids is None or ids["after"] is None or ids["end_id"] is None:
                    return []  # no order was created in the window
                after_id, end_id = ids["after"], ids["end_id"]
            query = sql.list_orders(tuple(filters), bounded=end_id != sql.NO_END)
            # One row beyond the page tells whether another page exists.
            return await db.fetch(
                context, query, *filters.values(), *sql.id_range(after_id, end_id), page_size + 1
            )

        rows = await self._reads.read("ListOrders", page)
        count = min(len(rows), page_size)
        next_page_token = ""
        if len(rows) > page_size:
            next_page_token = self._page_tokens.encode(
                rows[page_size - 1]["id"], end_id, fingerprint
            )
        # The page's bytes are written in C (service/orders/wire.c): building
        # the messages was a fifth of the call's CPU.
        return Encoded(encode_page(rows, count, STATUS_VALUES, next_page_token), count)

    @rpc
    async def UpdateOrderStatus(
        self, request: order_service_pb2.UpdateOrderStatusRequest, context: grpc.aio.ServicerContext
    ) -> order_pb2.Order:
        v = Violations()
        v.positive_id("id", request.id)
        if request.status not in STATUS_NAMES:
            v.add(
                "status",
                f"must be a valid OrderStatus other than UNSPECIFIED, got {request.status}",
            )
        if request.expected_version < 0:
            v.add("expected_version", "must be 0 (unconditional) or a version >= 1")
        v.text("request_id", request.request_id, max_length=MAX_ID_LENGTH, required=False)
        v.raise_if_any()

        allowed_from = ALLOWED_FROM[request.status]
        digest = request_digest(request) if request.request_id else b""
        try:
            row = await self._db.fetchrow(
                context,
                sql.UPDATE_ORDER_STATUS,
                request.id,
                STATUS_NAMES[request.status],
                list(allowed_from),
                request.expected_version,
                request.request_id,
                digest,
            )
        except asyncpg.UniqueViolationError as exc:
            if exc.constraint_name != "status_requests_pkey":
                raise
            row = None
        if row is not None:
            self._announce()
            return order_from_row(row)
        if request.request_id:
            replayed = await self._replayed_update(request, digest, context)
            if replayed is not None:
                return replayed
        raise await self._explain_refused_update(request, allowed_from, context)

    async def _replayed_update(
        self,
        request: order_service_pb2.UpdateOrderStatusRequest,
        digest: bytes,
        context: grpc.aio.ServicerContext,
    ) -> order_pb2.Order | None:
        """For a request_id that already made a change: the order as it now
        stands (a retry after a lost response), or ALREADY_EXISTS when the
        key came with another body. None for a key not seen (or forgotten)."""
        record = await self._db.fetchrow(context, sql.STATUS_REQUEST, request.request_id)
        if record is None:
            return None
        if record["request_hash"] != digest:
            order_id = str(record["order_id"])
            raise request_id_reused(f"a status change of order {order_id}", {"order_id": order_id})
        row = await self._db.fetch_by_id(context, sql.GET_ORDER, request.id, order_not_found)
        return order_from_row(row)

    async def _explain_refused_update(
        self,
        request: order_service_pb2.UpdateOrderStatusRequest,
        allowed_from: tuple[str, ...],
        context: grpc.aio.ServicerContext,
    ) -> ServiceError:
        state = await self._db.fetchrow(context, sql.ORDER_STATE, request.id)
        if state is None:
            return order_not_found(request.id)
        target = STATUS_NAMES[request.status]
        if request.expected_version and state["version"] != request.expected_version:
            return ServiceError(
                grpc.StatusCode.ABORTED,
                Reason.VERSION_MISMATCH,
                f"order {request.id} is at version {state['version']}, "
                f"not {request.expected_version}; re-read it and retry",
                retry_after=0.0,
                metadata={"current_version": str(state["version"])},
            )
        if state["status"] not in allowed_from:
            return ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                Reason.ILLEGAL_TRANSITION,
                f"order {request.id} cannot move from {state['status']} to {target}",
                metadata={"from": state["status"], "to": target},
            )
        # The order changed between the update and this look: say so.
        return ServiceError(
            grpc.StatusCode.ABORTED,
            Reason.CONCURRENT_UPDATE,
            f"order {request.id} changed concurrently; retry",
            retry_after=0.0,
        )

    @rpc
    async def ExportOrders(  # type: ignore[override]  # writes via context.write
        self, request: order_service_pb2.ExportOrdersRequest, context: grpc.aio.ServicerContext
    ) -> None:
        async def export(db: Database, sent: Sent) -> None:
            await export_orders(
                db,
                request,
                context,
                streams=self._streams,
                batch_bytes=self._batch_bytes,
                write_stall_timeout=self._timeouts.write_stall,
                sent=sent,
            )

        await self._reads.read("ExportOrders", export)

    @rpc
    async def ImportOrders(
        self,
        request_iterator: AsyncIterator[order_service_pb2.ImportOrdersRequest],
        context: grpc.aio.ServicerContext,
    ) -> order_service_pb2.ImportOrdersResponse:
        return await import_orders(
            self._db,
            self._streams,
            self._timeouts,
            request_iterator,
            context,
            on_commit=self._announce,
        )


def _filter_fingerprint(request: order_service_pb2.ListOrdersRequest) -> bytes:
    """Binds a page token to its query: every field but page size and token."""
    filters = order_service_pb2.ListOrdersRequest()
    filters.CopyFrom(request)
    filters.page_size = 0
    filters.page_token = ""
    return hashlib.sha256(filters.SerializeToString(deterministic=True)).digest()
