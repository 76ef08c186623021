"""Scenario 8: a commit whose acknowledgement is lost. The caller's retry
with the same key must return the original result and write nothing twice.

The proxy sees only TLS bytes, so it cannot spot the COMMIT: a deferred
constraint trigger (tests/faults/cluster.py GATE_SQL) holds the commit of
the marked rows until the test releases an advisory lock. While the backend
waits there, inside COMMIT, the test resets every proxied connection, then
releases the lock.

Observed with PostgreSQL 15: the backend does not notice the vanished
client while it waits for the lock (client_connection_check_interval is 0
by default), finishes the commit, fails only when it sends the reply
("could not send data to client: Connection reset by peer") and exits. So
the row is committed although the caller saw UNAVAILABLE - the test asserts
exactly that before it retries, so a change in that behaviour shows up
here rather than as a confusing ledger failure.
"""

from __future__ import annotations

import asyncio

import grpc

from tests.faults.ledger import order_request, upload_messages
from tests.support.polling import eventually
from tests.support.requests import unique


async def _lose_the_ack(admin, proxy, call) -> tuple[grpc.StatusCode, int]:
    """Runs `call` until its commit waits at the gate and resets the
    connections; returns the caller's status and the committing backend's
    pid. The caller opens the gate."""
    task = asyncio.ensure_future(call)

    async def at_the_gate() -> bool:
        return bool(await admin.waiting_at_gate())

    await eventually(at_the_gate, timeout=30, what="the commit to wait at the gate")
    [pid] = await admin.waiting_at_gate()
    proxy.cut()
    async with asyncio.timeout(30):
        try:
            await task
            code = grpc.StatusCode.OK
        except grpc.aio.AioRpcError as error:
            code = error.code()
    return code, pid


async def _gone(admin, pid: int) -> bool:
    return pid not in [row["pid"] for row in await admin.service_backends()]


async def test_lost_create_ack_is_not_applied_twice(scenario, admin, proxy, orders):
    key = unique("lost-ack")
    customer = f"gate:{key}"
    request = order_request(key, customer_id=customer)
    async with admin.gate(customer):
        code, pid = await _lose_the_ack(admin, proxy, orders.CreateOrder(request, timeout=60))
    assert code == grpc.StatusCode.UNAVAILABLE
    await eventually(lambda: _gone(admin, pid), what="the backend to finish its commit")
    committed = await admin.fetch("SELECT id FROM orders WHERE request_id = $1", key)
    assert len(committed) == 1, "the commit completed although its acknowledgement was lost"
    scenario.ledger.record("order", key, [request], code)

    retried = await orders.CreateOrder(request, timeout=30)
    assert retried.id == committed[0]["id"]
    assert await admin.fetchval("SELECT count(*) FROM orders WHERE request_id = $1", key) == 1


async def test_lost_upload_ack_is_not_applied_twice(scenario, admin, proxy, events):
    key = unique("lost-upload")
    subject = f"gate:{key}"
    requests = upload_messages(key, events=30, per_message=10, subject=subject)
    async with admin.gate(subject):
        code, pid = await _lose_the_ack(
            admin, proxy, events.UploadEvents(iter(requests), timeout=60)
        )
    assert code == grpc.StatusCode.UNAVAILABLE
    await eventually(lambda: _gone(admin, pid), what="the backend to finish its commit")
    stored = await admin.fetch("SELECT first_event_id FROM uploads WHERE upload_id = $1", key)
    assert len(stored) == 1, "the commit completed although its acknowledgement was lost"
    scenario.ledger.record("upload", key, requests, code)

    retried = await events.UploadEvents(iter(requests), timeout=30)
    assert retried.event_count == 30
    assert retried.first_event_id == stored[0]["first_event_id"]
    assert await admin.fetchval("SELECT count(*) FROM events WHERE subject = $1", subject) == 30
