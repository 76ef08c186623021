"""Point reads by id, coalesced: calls taken in together share a statement
(`WHERE id = ANY($1)`), and calls that arrive while it is under way share
the next.

Why: on this service a database round trip costs the event loop far more
than the SQL it carries (docs/benchmarks.md, "What stands in the way"):
the TLS writes, the wake-ups and the reads of the reply. Under load, calls
for single rows arrive faster than one round trip takes, so one statement
can answer all of them. At most one statement per `PointReads` is in
flight: a lone call starts its own at once and waits for nothing, and
calls arriving during it ride the next one, so the batch grows with the
load by itself. That needs calls to arrive together: with a single
grpc.aio server they came in one per turn of the loop and batches stayed
at one call; the process's acceptors (service/rpc/acceptors.py) take them
in side by side (docs/benchmarks.md#point-reads).

Each call keeps its own deadline (it stops waiting when its deadline
passes; the statement goes on for the others) and its own cancellation (a
cancelled call's answer is dropped). The statement runs under the longest
deadline among the calls it answers, within the usual timeouts; a failure
of the statement or of the pool fails the calls it was answering, as it
would have failed each of them alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import asyncpg

from service.db.batches import LongestDeadline, fail
from service.db.failures import CallDeadlineReached
from service.db.runner import Call, Database

# Ids per statement: enough for every call a busy process has in flight,
# small enough that one statement stays a short index walk.
MAX_BATCH = 256


class _Waiting:
    __slots__ = ("call", "future", "ident")

    def __init__(
        self, ident: int, call: Call, future: asyncio.Future[asyncpg.Record | None]
    ) -> None:
        self.ident = ident
        self.call = call
        self.future = future


class PointReads:
    """Reads single rows by id through `query`, whose $1 is a bigint[] of
    ids and whose rows carry their id in the column `id`."""

    def __init__(self, db: Database, query: str) -> None:
        self._db = db
        self._query = query
        self._queue: list[_Waiting] = []
        self._reading: asyncio.Task[None] | None = None  # the statement under way

    async def get(
        self, context: Call, ident: int, not_found: Callable[[int], Exception]
    ) -> asyncpg.Record:
        """The row with id `ident`; `not_found(ident)` raised if none."""
        loop = asyncio.get_running_loop()
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            raise CallDeadlineReached
        future: asyncio.Future[asyncpg.Record | None] = loop.create_future()
        self._queue.append(_Waiting(ident, context, future))
        if self._reading is None:
            self._start(loop)
        if remaining is None:
            row = await future
        else:
            try:
                row = await asyncio.wait_for(future, remaining)
            except TimeoutError:
                raise CallDeadlineReached from None
        if row is None:
            raise not_found(ident)
        return row

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._reading = loop.create_task(self._read(loop))

    async def _read(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            # The batch is taken when the task first runs, a turn of the loop
            # after it was started, not when it was started: the calls taken
            # in during that turn ride along. It made 7-15% more GetOrder calls
            # a second at 16 in flight (docs/benchmarks.md#point-reads), with
            # about 8.7 calls a statement instead of 7.2.
            batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
            waiting = [w for w in batch if not w.future.done()]  # left before it began
            if waiting:
                await self._answer(waiting)
        finally:
            self._reading = None
            self._queue = [w for w in self._queue if not w.future.done()]
            if self._queue:
                self._start(loop)

    async def _answer(self, waiting: list[_Waiting]) -> None:
        try:
            rows = await self._db.fetch(
                LongestDeadline([w.call for w in waiting]),
                self._query,
                list({w.ident for w in waiting}),
            )
        except BaseException as exc:
            fail((w.future for w in waiting), exc)
            if not isinstance(exc, Exception):
                raise
            return
        by_id = {row["id"]: row for row in rows}
        for w in waiting:
            if not w.future.done():
                w.future.set_result(by_id.get(w.ident))
