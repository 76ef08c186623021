"""Response messages a handler has already serialised.

StreamEvents and ExportOrders write their rows, and ListOrders and GetOrder
return their page or order, as protobuf wire bytes built in C (service/events/wire.c,
service/orders/wire.c) rather than as message objects. Their registered
serializers take an `Encoded` message's bytes as they are; every other
method keeps protobuf's own serializer, so no other call pays for this.
The metrics count an `Encoded` message's rows from `rows`.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message

# The methods whose handlers write only `Encoded` messages.
ENCODED_METHODS = frozenset(
    {
        "orderstream.events.v1.EventService.StreamEvents",
        "orderstream.orders.v1.OrderService.GetOrder",
        "orderstream.orders.v1.OrderService.ListOrders",
        "orderstream.orders.v1.OrderService.ExportOrders",
    }
)


class Encoded:
    """One response message in wire bytes, and how many rows it carries."""

    __slots__ = ("data", "rows")

    def __init__(self, data: bytes, rows: int) -> None:
        self.data = data
        self.rows = rows


def serializer(method: MethodDescriptor, message_class: type[Message]) -> Callable[[Any], bytes]:
    if method.full_name in ENCODED_METHODS:
        return operator.attrgetter("data")
    return message_class.SerializeToString
