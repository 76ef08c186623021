"""The order filters ListOrders and ExportOrders share, checked and turned
into query parameters."""

from __future__ import annotations

from orderstream.orders.v1 import order_pb2, order_service_pb2
from service.db.codecs import unix_micros
from service.orders import sql
from service.orders.convert import STATUS_NAMES
from service.rpc.validation import MAX_ID_LENGTH, Violations

OrderFilterRequest = order_service_pb2.ListOrdersRequest | order_service_pb2.ExportOrdersRequest


def order_filters(request: OrderFilterRequest, v: Violations) -> dict[str, object]:
    """Returns the set filters by name (sql.LIST_FILTERS keys), in the
    order the SQL builder expects; problems go to `v`."""
    v.text("customer_id", request.customer_id, max_length=MAX_ID_LENGTH, required=False)
    if request.status not in STATUS_NAMES and request.status != order_pb2.ORDER_STATUS_UNSPECIFIED:
        v.add("status", f"not a valid OrderStatus: {request.status}")
    filters: dict[str, object] = {}
    if request.customer_id:
        filters["customer_id"] = request.customer_id
    if request.status in STATUS_NAMES:
        filters["status"] = STATUS_NAMES[request.status]
    if request.HasField("created_after"):
        v.timestamp("created_after", request.created_after)
        filters["created_after"] = unix_micros(request.created_after)
    if request.HasField("created_before"):
        v.timestamp("created_before", request.created_before)
        filters["created_before"] = unix_micros(request.created_before)
    return filters


def window_query(filters: dict[str, object]) -> tuple[str, list[object]] | None:
    """The statement and arguments that find the ids a listing of the
    creation-time window `filters` set walks (sql.window_ids), or None when
    they set no window, or a customer: the walk of a customer's orders
    (orders_customer_id_id_idx) is bounded by them already, and finding the
    ids of a wide window would cost more than it saves."""
    if "customer_id" in filters:
        return None
    for window in sql.Window:
        if set(window.value) == {name for name in filters if name.startswith("created_")}:
            bounds = [filters[name] for name in window.value]
            return sql.window_ids(window), [*bounds, sql.WINDOW_EDGE_ROWS]
    return None
