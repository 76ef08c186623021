"""Coalesced point reads (service/db/point_reads.py): concurrent GetOrder and
GetEvent calls share statements, and each call keeps its own answer,
deadline and cancellation. Correctness only; bench/unary.py measures."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import grpc
import pytest

from orderstream.events.v1 import event_pb2, event_service_pb2
from orderstream.orders.v1 import order_service_pb2
from service.app import App
from service.db.failures import CallDeadlineReached
from service.db.point_reads import PointReads
from service.db.runner import Database
from service.orders import sql
from tests.support.apps import pool_is_full
from tests.support.polling import eventually
from tests.support.requests import create_request

pytestmark = pytest.mark.through_pgbouncer

# The orders statement, made slow enough that calls pile up behind it.
SLOW_ORDERS = sql.GET_ORDERS + " AND pg_sleep(0.4) IS NOT NULL"


class Deadline:
    def __init__(self, seconds: float | None) -> None:
        loop = asyncio.get_running_loop()
        self._until = None if seconds is None else loop.time() + seconds
        self._loop = loop

    def time_remaining(self) -> float | None:
        return None if self._until is None else self._until - self._loop.time()


class CountingDatabase(Database):
    """The service's Database, recording the ids of each statement."""

    def __init__(self, app: App) -> None:
        super().__init__(app.pool, acquire_timeout=5, command_timeout=10)
        self.statements: list[list[int]] = []
        self.started = asyncio.Event()  # a statement began

    async def fetch(self, context: Any, query: str, *args: Any) -> list[Any]:
        self.statements.append(sorted(args[0]))
        self.started.set()
        return await super().fetch(context, query, *args)


class Missing(Exception):
    pass


async def some_orders(orders, n: int) -> list[int]:
    created = await asyncio.gather(*(orders.CreateOrder(create_request()) for _ in range(n)))
    return [o.id for o in created]


async def test_concurrent_get_order_calls_each_get_their_own_order(orders):
    ids = await some_orders(orders, 20)
    missing = [max(ids) + 1_000_000 + n for n in range(20)]
    asked = [random.choice(ids + missing) for _ in range(300)]

    async def get(ident: int) -> int | str:
        try:
            return (await orders.GetOrder(order_service_pb2.GetOrderRequest(id=ident))).id
        except grpc.aio.AioRpcError as error:
            assert str(ident) in (error.details() or "")
            return error.code().name

    answers = await asyncio.gather(*(get(i) for i in asked))

    assert answers == [i if i in ids else "NOT_FOUND" for i in asked]


async def test_concurrent_get_event_calls_each_get_their_own_event(events):
    published = await events.PublishEvents(
        event_service_pb2.PublishEventsRequest(
            events=[
                event_pb2.Event(type="point.read", source="/t", subject=f"s/{n}", json_payload="{}")
                for n in range(10)
            ]
        )
    )
    ids = list(published.ids)
    asked = [random.choice(ids) for _ in range(100)]

    got = await asyncio.gather(
        *(events.GetEvent(event_service_pb2.GetEventRequest(id=i)) for i in asked)
    )

    assert [(e.id, e.subject) for e in got] == [(i, f"s/{ids.index(i)}") for i in asked]


async def test_calls_arriving_together_share_a_statement_and_later_ones_the_next(app, orders):
    ids = await some_orders(orders, 31)
    db = CountingDatabase(app)
    reads = PointReads(db, sql.GET_ORDERS)

    together = asyncio.gather(*(reads.get(Deadline(None), i, Missing) for i in ids[:10]))
    await db.started.wait()  # their statement is under way
    later = asyncio.gather(*(reads.get(Deadline(None), i, Missing) for i in ids[10:]))

    assert [row["id"] for row in await together] == ids[:10]
    assert [row["id"] for row in await later] == ids[10:]
    # The first ten, taken in in the same turn of the loop, shared the first
    # statement (it takes its calls when it begins, not when the first call
    # started it); the 21 that arrived while it ran shared the next.
    assert db.statements == [sorted(ids[:10]), sorted(ids[10:])]


async def test_a_call_whose_deadline_passes_fails_alone(app, orders):
    first, second = await some_orders(orders, 2)
    db = CountingDatabase(app)
    reads = PointReads(db, SLOW_ORDERS)

    patient = asyncio.create_task(reads.get(Deadline(None), first, Missing))
    hasty = asyncio.create_task(reads.get(Deadline(0.05), second, Missing))
    already_late = asyncio.create_task(reads.get(Deadline(0), second, Missing))

    with pytest.raises(CallDeadlineReached):
        await hasty
    with pytest.raises(CallDeadlineReached):
        await already_late
    assert not patient.done()  # the statement went on for the other call
    assert (await patient)["id"] == first


class BehindASlowRead:
    """Three orders: the first read alone in a slow statement, the other two
    queued behind it (`kept`, and `cancelled` for the test to cancel)."""

    def __init__(self, app: App, ids: list[int]) -> None:
        self.db = CountingDatabase(app)
        self.reads = PointReads(self.db, SLOW_ORDERS)
        self.ids = ids

    async def start(self) -> None:
        first, second, third = self.ids
        self.lone = asyncio.create_task(self.get(first))
        await self.db.started.wait()  # its statement is under way
        self.kept = asyncio.create_task(self.get(second))
        self.cancelled = asyncio.create_task(self.get(third))

    def get(self, ident: int) -> Any:
        return self.reads.get(Deadline(None), ident, Missing)


async def test_a_call_cancelled_during_its_read_leaves_the_others_answered(app, orders):
    first, second, third = ids = await some_orders(orders, 3)
    slow = BehindASlowRead(app, ids)
    await slow.start()
    lone, kept, cancelled, db, reads = slow.lone, slow.kept, slow.cancelled, slow.db, slow.reads
    await asyncio.sleep(0)
    cancelled.cancel()

    assert (await lone)["id"] == first
    assert (await kept)["id"] == second
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    # The cancelled call's id was dropped before its statement began, and
    # reads go on afterwards.
    assert db.statements == [[first], [second]]
    assert (await reads.get(Deadline(None), third, Missing))["id"] == third


async def test_a_missing_id_fails_only_its_own_call(app, orders):
    (present,) = await some_orders(orders, 1)
    reads = PointReads(CountingDatabase(app), sql.GET_ORDERS)

    found, absent = await asyncio.gather(
        reads.get(Deadline(None), present, Missing),
        reads.get(Deadline(None), present + 10_000_000, Missing),
        return_exceptions=True,
    )

    assert found["id"] == present
    assert isinstance(absent, Missing)


async def test_a_call_cancelled_while_its_statement_runs_leaves_its_batch_answered(app, orders):
    first, second, third = ids = await some_orders(orders, 3)
    slow = BehindASlowRead(app, ids)
    await slow.start()
    kept, cancelled, db = slow.kept, slow.cancelled, slow.db
    assert (await slow.lone)["id"] == first

    async def shared_statement_running() -> bool:
        return db.statements == [[first], sorted([second, third])]

    await eventually(shared_statement_running, what="the two calls' statement to start")
    cancelled.cancel()

    assert (await kept)["id"] == second
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    # The pool has every connection back: the statement was not abandoned.
    await eventually(lambda: pool_is_full(app), what="the pool to be whole")
