"""CreateOrder's batches (service/orders/create_batches.py), against the real
database: creates that wait for a free statement share the next one, yet
each call keeps its own outcome, deadline and cancellation.

The batcher is driven in process, on a pool of its own, so that which
creates share a statement is decided by the test, not by timing: every
statement the batcher may run at once is held on a lock (a request_id that another
transaction is inserting, as a concurrent create of the same request
would), the creates started meanwhile wait together, and releasing the
lock lets them go as one statement. Whether orders were written in one
transaction is read from their creation times. The same calls through gRPC,
directly and through PgBouncer, are in tests/test_orders.py.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import asyncpg
import grpc
import pytest

from devcluster.cluster import Cluster
from service.db.failures import CallDeadlineReached, PoolExhausted
from service.db.runner import Database
from service.errors import Reason, ServiceError
from service.orders.create_batches import IN_FLIGHT, CreateBatches, NewOrder
from tests.support.database import admin_pool
from tests.support.polling import eventually
from tests.support.requests import unique


class _Call:
    """A call's deadline as the batcher sees it (a ServicerContext's)."""

    def __init__(self, remaining: float | None = None) -> None:
        self.remaining = remaining

    def time_remaining(self) -> float | None:
        return self.remaining


def new_order(n: int = 1, **fields: object) -> NewOrder:
    """An order with `n` items, each of its own, so that a mix-up shows."""
    values: dict[str, object] = {
        "request_id": unique("batch"),
        "digest": b"\x01" * 32,
        "customer_id": unique("cust"),
        "currency": "EUR",
        "total_cents": sum(100 * k for k in range(1, n + 1)),
        "skus": [f"SKU-{n}-{k}" for k in range(1, n + 1)],
        "quantities": [k for k in range(1, n + 1)],
        "prices": [100] * n,
    }
    values.update(fields)
    return NewOrder(**values)  # type: ignore[arg-type]


# A batcher and the list its commits are announced to.
Batcher = tuple[CreateBatches, list[None]]


@pytest.fixture
async def batcher_on(pg_cluster: Cluster, app: object) -> AsyncIterator[Callable[..., Batcher]]:
    """Makes batchers on a pool of their own (after `app`: the schema
    exists). A statement never counts as waiting unless a test says so:
    which creates share a statement is the test's to decide."""
    async with admin_pool(pg_cluster, min_size=1, max_size=IN_FLIGHT + 2) as pool:

        def make(
            waiting_after: float = 600.0,
            max_statements: int = IN_FLIGHT + 1,
            acquire_timeout: float = 5.0,
        ) -> Batcher:
            commits: list[None] = []
            batches = CreateBatches(
                Database(pool, acquire_timeout=acquire_timeout, command_timeout=30),
                on_commit=lambda: commits.append(None),
                waiting_after=waiting_after,
                max_statements=max_statements,
            )
            return batches, commits

        yield make


@pytest.fixture
def batcher(batcher_on: Callable[..., Batcher]) -> Batcher:
    return batcher_on()


@contextlib.asynccontextmanager
async def request_id_taken(admin_db: asyncpg.Pool) -> AsyncIterator[str]:
    """A request_id another transaction is inserting and has not committed:
    a create of it waits; the transaction is rolled back on the way out."""
    request_id = unique("held")
    async with admin_db.acquire() as conn:
        transaction = conn.transaction()
        await transaction.start()
        try:
            await conn.execute(
                "INSERT INTO orders (request_id, request_hash, customer_id, currency,"
                " total_cents) VALUES ($1, '\\x00', 'holder', 'EUR', 0)",
                request_id,
            )
            yield request_id
        finally:
            await transaction.rollback()


async def statements_waiting(admin_db: asyncpg.Pool) -> int:
    return await admin_db.fetchval(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE wait_event_type = 'Lock' AND position('orders_create_batch' IN query) > 0"
    )


@contextlib.asynccontextmanager
async def statements_held(
    batches: CreateBatches, admin_db: asyncpg.Pool
) -> AsyncIterator[tuple[str, list[asyncio.Task]]]:
    """Every statement the batcher may run at once, held on a lock until
    the block ends; the creates started in the block wait together for the
    next. Yields the held request_id (one of the holding creates writes it
    when the lock goes) and the holding creates' tasks."""
    async with request_id_taken(admin_db) as held:
        holders = [
            asyncio.create_task(batches.create(_Call(), new_order(request_id=held)))
            for _ in range(IN_FLIGHT)
        ]

        async def all_held() -> bool:
            return await statements_waiting(admin_db) == IN_FLIGHT

        await eventually(all_held, what="statements held")
        yield held, holders
    await asyncio.gather(*holders, return_exceptions=True)


def start(batches: CreateBatches, *orders: NewOrder, call: Callable[[], _Call] = _Call):
    """Creates started now: each is queued before this returns to the loop."""
    return [asyncio.create_task(batches.create(call(), order)) for order in orders]


async def queued() -> None:
    """Lets the creates just started run to their wait: one turn of the
    loop, as each queues its order in its first step."""
    await asyncio.sleep(0)


async def transactions_of(admin_db: asyncpg.Pool, ids: list[int]) -> int:
    """How many transactions wrote these orders, by their create_time: it
    is now(), the time its transaction started (xmin cannot tell: each
    order is written in a subtransaction of its own)."""
    return await admin_db.fetchval(
        "SELECT count(DISTINCT create_time) FROM orders WHERE id = ANY($1)", ids
    )


async def written(admin_db: asyncpg.Pool, request_id: str) -> bool:
    return (
        await admin_db.fetchval("SELECT count(*) FROM orders WHERE request_id = $1", request_id)
        == 1
    )


async def test_creates_that_wait_together_share_one_transaction_each_with_its_own_order(
    batcher, admin_db
):
    batches, commits = batcher
    orders = [new_order(n) for n in range(1, 21)]
    async with statements_held(batches, admin_db):
        tasks = start(batches, *orders)
        await queued()
        assert not any(task.done() for task in tasks)
    rows = await asyncio.gather(*tasks)

    ids = [row["id"] for row in rows]
    assert None not in ids and len(set(ids)) == 20
    assert await transactions_of(admin_db, ids) == 1
    for order, row in zip(orders, rows, strict=True):
        stored = await admin_db.fetchrow(
            """
            SELECT o.request_id, o.customer_id, o.total_cents,
                   array_agg(i.sku ORDER BY i.line_no) AS skus,
                   array_agg(i.quantity ORDER BY i.line_no) AS quantities
            FROM orders o JOIN order_items i ON i.order_id = o.id
            WHERE o.id = $1 GROUP BY o.id
            """,
            row["id"],
        )
        assert (stored["request_id"], stored["customer_id"], stored["total_cents"]) == (
            order.request_id,
            order.customer_id,
            order.total_cents,
        )
        assert (stored["skus"], stored["quantities"]) == (order.skus, order.quantities)
    events = await admin_db.fetch(
        "SELECT subject, payload->>'customer_id' AS customer FROM events"
        " WHERE type = 'order.created' AND subject = ANY($1)",
        [f"orders/{i}" for i in ids],
    )
    assert sorted((e["subject"], e["customer"]) for e in events) == sorted(
        (f"orders/{row['id']}", order.customer_id) for order, row in zip(orders, rows, strict=True)
    )
    # The holders' statement and the twenty's: each announced once.
    assert len(commits) == 2


async def test_a_request_id_twice_in_one_batch_is_written_once(batcher, admin_db):
    batches, _ = batcher
    first = new_order(2)
    again = new_order(2, request_id=first.request_id)
    async with statements_held(batches, admin_db):
        tasks = start(batches, first, again)
        await queued()
    created, repeated = await asyncio.gather(*tasks)

    # The second finds the first's row, in the same transaction: nothing is
    # written for it, and CreateOrder answers it as a replay.
    assert created["id"] is not None and repeated["id"] is None
    assert await written(admin_db, first.request_id)


async def test_an_order_the_database_refuses_fails_alone(batcher, admin_db):
    batches, _ = batcher
    refused_customer = unique("refused")
    # A rule the service's own checks do not know: only the database
    # refuses the order (NOT VALID: existing rows are not looked at).
    constraint = f"test_refuse_{refused_customer.replace('-', '_')}"
    await admin_db.execute(
        f"ALTER TABLE orders ADD CONSTRAINT {constraint}"
        f" CHECK (customer_id <> '{refused_customer}') NOT VALID"
    )
    try:
        good, bad, other = new_order(1), new_order(2, customer_id=refused_customer), new_order(3)
        async with statements_held(batches, admin_db):
            tasks = start(batches, good, bad, other)
            await queued()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        await admin_db.execute(f"ALTER TABLE orders DROP CONSTRAINT {constraint}")

    error = outcomes[1]
    assert isinstance(error, ServiceError)
    assert (error.code, error.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        Reason.CONSTRAINT_VIOLATED,
    )
    ids = [outcomes[0]["id"], outcomes[2]["id"]]
    assert await transactions_of(admin_db, ids) == 1
    assert not await written(admin_db, bad.request_id)
    assert (
        await admin_db.fetchval(
            "SELECT count(*) FROM events WHERE payload->>'customer_id' = $1", refused_customer
        )
        == 0
    )


async def test_a_call_that_ends_while_it_waits_is_never_written(batcher, admin_db):
    batches, _ = batcher
    leaving, staying = new_order(1), new_order(1)
    async with statements_held(batches, admin_db):
        left, stays = start(batches, leaving, staying)
        await queued()
        left.cancel()  # at its deadline, gRPC cancels the handler like this
        with pytest.raises(asyncio.CancelledError):
            await left
    await stays

    assert await written(admin_db, staying.request_id)
    assert not await written(admin_db, leaving.request_id)


async def test_a_call_past_its_deadline_is_not_queued(batcher, admin_db):
    batches, _ = batcher
    late = new_order(1)
    with pytest.raises(CallDeadlineReached):
        await batches.create(_Call(remaining=0.0), late)
    assert not await written(admin_db, late.request_id)


async def test_a_call_cancelled_while_its_statement_runs_leaves_the_others_be(batcher, admin_db):
    """The statement goes on without it: its order is written, as any write
    whose answer was lost may be, and a retry finds it (no second order)."""
    batches, _ = batcher
    async with statements_held(batches, admin_db) as (held, holders):
        holders[0].cancel()
        with pytest.raises(asyncio.CancelledError):
            await holders[0]
        after = start(batches, new_order(1))
        await queued()
    row = await after[0]
    assert row["id"] is not None

    retried = await batches.create(_Call(), new_order(1, request_id=held))
    assert retried["id"] is None
    assert await written(admin_db, held)


async def test_a_statement_that_fails_fails_each_of_its_calls_and_the_next_goes_on(
    batcher, admin_db
):
    """Two creates with a one-second deadline share a statement that waits
    on a lock: at the deadline the statement is cancelled, both calls fail
    with it and neither order is written; creates after it go on."""
    batches, _ = batcher
    async with request_id_taken(admin_db) as blocking:
        async with statements_held(batches, admin_db):
            doomed = [new_order(1, request_id=blocking), new_order(2)]
            failing = start(batches, *doomed, call=lambda: _Call(remaining=1.0))
            await queued()
        outcomes = await asyncio.gather(*failing, return_exceptions=True)
    assert all(isinstance(outcome, TimeoutError) for outcome in outcomes), outcomes
    assert not await written(admin_db, doomed[1].request_id)
    after = await batches.create(_Call(), new_order(1))
    assert after["id"] is not None


async def test_creates_do_not_wait_behind_a_statement_that_waits(batcher_on, admin_db):
    """A statement still running after `waiting_after` stops counting: a
    create arriving while every statement in flight waits on a lock is
    written in one of its own, and the held ones go on once the lock goes."""
    batches, _ = batcher_on(waiting_after=0.05)
    async with statements_held(batches, admin_db) as (held, holders):
        row = await batches.create(_Call(), new_order(2))
        assert row["id"] is not None
        assert not any(holder.done() for holder in holders)
    assert await written(admin_db, held)


async def test_statements_that_wait_hold_at_most_max_statements_connections(batcher_on, admin_db):
    """Once `max_statements` statements run (here: all of them waiting on a
    lock, so none counts as working), a create waits for one to end instead
    of taking another connection: the creates that arrive meanwhile go
    together, in one transaction, when the lock goes. Without the bound the
    first of them would have gone at once, alone."""
    waiting_after = 0.01
    batches, _ = batcher_on(waiting_after=waiting_after, max_statements=IN_FLIGHT + 1)
    async with statements_held(batches, admin_db) as (held, _):
        beside = start(batches, new_order(1, request_id=held))

        async def both_held() -> bool:
            return await statements_waiting(admin_db) == IN_FLIGHT + 1

        await eventually(both_held, what="a second statement beside the first")
        # Past the second statement's waiting_after: asyncio runs timers in
        # deadline order, so neither statement counts as working now.
        await asyncio.sleep(2 * waiting_after)
        waiting = start(batches, new_order(1), new_order(2), new_order(3))
        await queued()
    rows = await asyncio.gather(*waiting)
    await asyncio.gather(*beside)
    assert await transactions_of(admin_db, [row["id"] for row in rows]) == 1


async def test_a_create_the_bound_keeps_out_fails_as_a_pool_wait_would(batcher_on, admin_db):
    """With every statement the bound allows held, a create waits no longer
    than a call waits for a pooled connection: it fails with PoolExhausted
    (RESOURCE_EXHAUSTED, retryable) and is never written; once a statement
    ends, creates go on."""
    batches, _ = batcher_on(max_statements=IN_FLIGHT, acquire_timeout=0.2)
    async with statements_held(batches, admin_db) as (held, _):
        order = new_order(1)
        async with asyncio.timeout(5):
            with pytest.raises(PoolExhausted):
                await batches.create(_Call(), order)
    assert not await written(admin_db, order.request_id)
    assert await written(admin_db, held)
    after = await batches.create(_Call(), new_order(1))
    assert after["id"] is not None
