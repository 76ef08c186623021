"""Server-stream messages packed from rows by a C encoder, bounded in bytes.

StreamEvents and ExportOrders write rows as runs of their response's
repeated field, encoded in C (service/events/wire.c, service/orders/wire.c);
runs joined are one response message. `Messages` fills a message up to the
byte budget and writes it when the next row does not fit, so a message
exceeds the budget only by holding a single row larger than it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from service.rpc.encoded import Encoded

# encode(rows, start, used, budget) -> (bytes, next): the rows from `start`
# that fit beside `used` bytes within `budget` (one at least when used is
# 0), and the index of the first row left.
Encode = Callable[[Sequence[Any], int, int, int], tuple[bytes, int]]


class Messages:
    """Packs rows, each with its id in column 0, into messages of at most
    `budget` bytes; `write(message, last_id)` sends one, and waits for the
    reader (the stream's back-pressure)."""

    def __init__(
        self, encode: Encode, write: Callable[[Encoded, int], Awaitable[None]], budget: int
    ) -> None:
        self._encode = encode
        self._write = write
        self._budget = budget
        self._chunks: list[bytes] = []
        self._size = 0
        self._rows = 0
        self._last = 0  # the id of the last row packed so far

    async def add(self, rows: Sequence[Any]) -> None:
        start, count = 0, len(rows)
        while start < count:
            chunk, end = self._encode(rows, start, self._size, self._budget)
            if chunk:
                self._chunks.append(chunk)
                self._size += len(chunk)
                self._rows += end - start
                self._last = rows[end - 1][0]
                start = end
            if start < count:  # row `start` did not fit: this message is full
                await self.flush()

    def discard(self) -> None:
        """Forgets what is packed and not sent (a read that failed halfway
        is read again from the last row sent)."""
        self._chunks, self._size, self._rows = [], 0, 0

    async def flush(self) -> None:
        if self._rows:
            message = Encoded(b"".join(self._chunks), self._rows)
            self._chunks, self._size, self._rows = [], 0, 0
            await self._write(message, self._last)
