"""Response messages a handler has already serialised.

StreamEvents writes its rows as protobuf wire bytes built in C
(service/event_wire.c) rather than as message objects: the registered
serializer passes an `Encoded` through untouched and serialises anything else
as usual, and the metrics count its rows from `rows`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from google.protobuf.message import Message


class Encoded:
    """One response message in wire bytes, and how many rows it carries."""

    __slots__ = ("data", "rows")

    def __init__(self, data: bytes, rows: int) -> None:
        self.data = data
        self.rows = rows


def serializer(message_class: type[Message]) -> Callable[[Any], bytes]:
    serialize = message_class.SerializeToString

    def to_bytes(message: Any) -> bytes:
        if message.__class__ is Encoded:
            return message.data  # type: ignore[no-any-return]
        return serialize(message)

    return to_bytes
