"""Driving a C encoder of a server stream's messages (service/events/wire.c,
service/orders/wire.c) as the stream does, holding it to the budget rules."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

# encode(rows, start, used, budget) -> (bytes, next), as the encoders take it.
Encode = Callable[[Sequence[Any], int, int, int], tuple[bytes, int]]


def messages_of(
    encode: Encode, rows: Sequence[Any], budget: int, entry_size: Callable[[Any], int]
) -> list[bytes]:
    """The messages a stream writes for `rows`: one is sent when the next
    row does not fit in it. Asserts along the way that each chunk keeps its
    message within `budget` (unless it is one row alone in an empty
    message), that an empty message always takes a row, and that a message
    is sent only when the next row (`entry_size` bytes) would not fit."""
    messages, message, start = [], b"", 0
    while start < len(rows):
        chunk, end = encode(rows, start, len(message), budget)
        assert len(message) + len(chunk) <= budget or (not message and end == start + 1)
        message += chunk
        start = end
        if start < len(rows):
            assert message, "an empty message always takes a row"
            assert len(message) + entry_size(rows[start]) > budget  # it did not fit
            messages.append(message)
            message = b""
    messages.append(message)
    return messages
