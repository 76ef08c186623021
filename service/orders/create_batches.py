"""CreateOrder calls written together: the creates that arrive while earlier
ones are being written share the next statement, one transaction and one
commit (orders_create_batch, migrations/0013_order_create_batches.sql).

A create costs PostgreSQL far more than a read: its commit is a WAL flush,
and the database, not the service, is what limits CreateOrder's rate on the
benchmark machine. Four creates in one transaction cost PostgreSQL 189 µs
of CPU each against 304 µs alone (docs/benchmarks.md#createorder-batches).
So one statement of creates works at a time (`IN_FLIGHT`); a create that
finds none working goes at once, alone if it is alone (a lone call waits
for nothing), and those arriving meanwhile wait for the next, which takes
them all, up to `MAX_ORDERS`. A statement still running after
`WAITING_AFTER` is taken to be waiting (on its commit's flush, a lock, a
silent server) and stops counting, so the next batch goes beside it:
batches fill where the database's CPU is the limit and overlap where its
latency is, and creates never queue behind a statement that is stuck.
Statements of creates, waiting or working, hold at most half the pool's
connections (`max_statements`), so that a burst of creates on a slow
commit cannot take the connections every other call needs; creates beyond
that wait for the next batch, which grows instead, and one that waits
longer than a call waits for a pooled connection fails as that call would
(PoolExhausted: RESOURCE_EXHAUSTED, retryable).
Point reads share statements the same way, for another reason
(service/db/point_reads.py: there the service's loop is the limit, and a
round trip is what a read costs it most).

What each call keeps as its own:
- its outcome: each order runs under its own subtransaction, so one the
  database refuses is rolled back alone and only its call fails; an error
  of the whole statement (the server read-only, the connection lost) fails
  every call of the batch, as it would have failed each on its own;
- its deadline and cancellation: a call that ends while it waits is taken
  out and never written. Once its statement is sent, the call may still
  end (gRPC cancels the handler at its deadline), but the statement goes
  on for the others, so the order may be written after its caller was told
  DEADLINE_EXCEEDED or CANCELLED, as with any write whose answer was lost:
  a retry with the same request_id gets that order back, never a second.
  The statement is bounded by the longest remaining deadline in it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from service.db.batches import LongestDeadline, fail
from service.db.failures import PoolExhausted
from service.db.runner import Call, Database
from service.orders import sql
from service.rpc.status_map import from_sqlstate

# Statements of creates working at once. One made the most calls a second
# on the benchmark machine, where PostgreSQL's CPU is the limit (the largest
# batches): 15-20% more than two at 16 concurrent calls.
IN_FLIGHT = 1
# Orders in one statement at most: bounds its size and how long it holds
# its rows' locks.
MAX_ORDERS = 64
# Seconds after which a statement still running is taken to be waiting
# rather than working, and stops counting against IN_FLIGHT: the creates
# behind it go on in a statement beside it. A batch of a few orders is
# written in about a millisecond; a statement running longer is most often
# waiting, on its commit's flush, a synchronous standby, a lock or a server
# that went silent (a lost host: it ends only at its calls' deadlines), and
# the creates that came after it must not wait for that. With every
# transaction held 15 ms (a scratch trigger), batches made 0.5 of the
# peer's calls a second with 0.1 s here and 0.95 with 2 ms; where
# PostgreSQL's CPU is the limit, 2 ms still makes 1.6-1.8 times the peer
# (docs/benchmarks.md#createorder-batches).
WAITING_AFTER = 0.002


@dataclass(frozen=True, slots=True)
class NewOrder:
    """What orders_create takes for one order."""

    request_id: str
    digest: bytes
    customer_id: str
    currency: str
    total_cents: int
    skus: Sequence[str]
    quantities: Sequence[int]
    prices: Sequence[int]


@dataclass(slots=True)
class _Queued:
    order: NewOrder
    call: Call
    outcome: asyncio.Future[asyncpg.Record]
    since: float  # the loop's time when it was queued


class _Statement:
    """A statement of creates; `counted` while it counts as working."""

    __slots__ = ("counted",)

    def __init__(self) -> None:
        self.counted = True


class CreateBatches:
    """Writes CreateOrder's orders, gathered into batches."""

    def __init__(
        self,
        db: Database,
        *,
        on_commit: Callable[[], None],
        waiting_after: float = WAITING_AFTER,
        max_statements: int | None = None,
    ) -> None:
        """`on_commit` is called once for each statement that wrote an order
        (the event feed's wake-up). `max_statements`: statements of creates
        at once, waiting or not; by default half the pool's connections.
        Without a bound, 64 creates in flight on slow commits ran up to 17
        statements against a pool of 16, and GetOrder beside them made
        15-25% fewer calls a second than with the bound at 8, its p99 half
        again as long (docs/benchmarks.md#createorder-batches)."""
        self._db = db
        self._on_commit = on_commit
        self._waiting_after = waiting_after
        self._max_statements = max_statements or max(1, db.pool.get_max_size() // 2)
        self._queue: list[_Queued] = []
        self._working = 0  # statements counted as working (not yet past waiting_after)
        self._statements = 0  # statements running, working or waiting
        self._expiry: asyncio.TimerHandle | None = None  # for creates kept out by the bound
        self._tasks: set[asyncio.Task[None]] = set()

    async def create(self, call: Call, order: NewOrder) -> asyncpg.Record:
        """The order's row of orders_create_batch: `id` and the rest, all
        NULL when the request_id was taken (nothing was written). An order
        the database refused raises its status, as the same error raised
        by a statement of its own would have."""
        self._db.query_timeout(call)  # a call already past its deadline goes no further
        loop = asyncio.get_running_loop()
        outcome: asyncio.Future[asyncpg.Record] = loop.create_future()
        self._queue.append(_Queued(order, call, outcome, loop.time()))
        self._start_or_wait()
        # A cancelled call cancels `outcome`: a batch that has not taken it
        # yet leaves it out.
        row = await outcome
        if row["refused"] is not None:
            refusal = from_sqlstate(row["refused"])
            # The function catches classes 22 and 23 only, both in the table.
            assert refusal is not None, f"unmapped SQLSTATE {row['refused']}"
            raise refusal
        return row

    def _start_or_wait(self) -> None:
        """Starts the next batch if one may start; if the bound keeps it
        out, makes sure the creates waiting are failed once they have
        waited as long as a pooled connection is waited for."""
        if self._working < IN_FLIGHT and self._statements < self._max_statements:
            self._start()
        elif self._statements >= self._max_statements and self._expiry is None:
            self._expiry = asyncio.get_running_loop().call_at(
                self._queue[0].since + self._db.acquire_timeout, self._expire
            )

    def _expire(self) -> None:
        """Fails the creates that have waited `acquire_timeout`."""
        self._expiry = None
        limit = self._db.acquire_timeout
        cutoff = asyncio.get_running_loop().time() - limit  # queued by then: waited enough
        waiting: list[_Queued] = []
        for queued in self._queue:
            if queued.outcome.done():
                continue
            if queued.since <= cutoff:
                queued.outcome.set_exception(PoolExhausted(limit))
            else:
                waiting.append(queued)
        self._queue = waiting
        if waiting:
            self._start_or_wait()

    def _start(self) -> None:
        """Starts a statement with the oldest creates still waiting (the
        cancelled ones are dropped), if any."""
        batch: list[_Queued] = []
        while self._queue and not batch:
            batch = [q for q in self._queue[:MAX_ORDERS] if not q.outcome.done()]
            del self._queue[:MAX_ORDERS]
        if not batch:
            return
        self._working += 1
        self._statements += 1
        task = asyncio.get_running_loop().create_task(self._write(batch))
        self._tasks.add(task)  # asyncio keeps only weak references to tasks
        task.add_done_callback(self._tasks.discard)

    async def _write(self, batch: list[_Queued]) -> None:
        statement = _Statement()
        past_work = asyncio.get_running_loop().call_later(
            self._waiting_after, self._done, statement
        )
        try:
            rows = await self._db.fetch(
                LongestDeadline([q.call for q in batch]), sql.CREATE_ORDERS, *_columns(batch)
            )
        except BaseException as exc:
            fail((q.outcome for q in batch), exc)
            if not isinstance(exc, Exception):
                raise
        else:
            if any(row["id"] is not None for row in rows):
                self._on_commit()
            for queued, row in zip(batch, rows, strict=True):
                if not queued.outcome.done():
                    queued.outcome.set_result(row)
        finally:
            past_work.cancel()
            self._statements -= 1
            self._done(statement)

    def _done(self, statement: _Statement) -> None:
        """`statement` ended, or is waiting: it no longer counts as
        working, and the next batch may start."""
        if statement.counted:
            statement.counted = False
            self._working -= 1
        if self._queue:
            self._start_or_wait()


def _columns(batch: list[_Queued]) -> tuple[list[Any], ...]:
    """orders_create_batch's arguments: one array per column, the items of
    all orders in three arrays with a count per order."""
    orders = [q.order for q in batch]
    return (
        [o.request_id for o in orders],
        [o.digest for o in orders],
        [o.customer_id for o in orders],
        [o.currency for o in orders],
        [o.total_cents for o in orders],
        [len(o.skus) for o in orders],
        [sku for o in orders for sku in o.skus],
        [quantity for o in orders for quantity in o.quantities],
        [price for o in orders for price in o.prices],
    )
