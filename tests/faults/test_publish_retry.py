"""Scenario 10: PublishEvents through the default client while commit
acknowledgements are lost. Every event the client was told about is
stored exactly once.

The calls go through `orderstream.client.publish_events` on a
`create_channel` channel, as an application would make them: the helper
gives each call a request_id and sends it again after UNAVAILABLE. Their
commits wait at the gate (tests/faults/cluster.py GATE_SQL, as in
test_lost_ack.py) while the test resets every proxied connection; the
client retries at once, and each retry waits on the key its first attempt
has not finished committing. Then the gates open: the first attempts
commit although their acknowledgement is lost, and each retry must answer
with their ids and write nothing.
"""

from __future__ import annotations

import asyncio
import contextlib

import grpc

from orderstream.client import create_channel, publish_events
from orderstream.events.v1 import event_service_pb2
from tests.faults.ledger import publish_request
from tests.support.polling import eventually
from tests.support.requests import unique

CALLS = 4  # below the service's pool (8): each retry holds a connection while it waits
EVENTS_PER_CALL = 3


async def _retries_waiting_on_keys(admin) -> int:
    """Service backends waiting for another transaction to end: a retry's
    key insert waiting on its uncommitted first attempt."""
    return sum(
        1
        for row in await admin.service_backends()
        if row["wait_event_type"] == "Lock" and row["wait_event"] == "transactionid"
    )


async def test_published_events_are_stored_once_when_acks_are_lost(scenario, service, admin, proxy):
    keys = [unique("lost-publish") for _ in range(CALLS)]
    requests = [publish_request(key, EVENTS_PER_CALL, subject=f"gate:{key}") for key in keys]
    async with (
        create_channel(f"127.0.0.1:{service.target.port}", insecure=True) as channel,
        contextlib.AsyncExitStack() as gates,
    ):
        for request in requests:
            await gates.enter_async_context(admin.gate(request.events[0].subject))
        calls = [
            asyncio.ensure_future(
                publish_events(channel, request.events, request_id=request.request_id, timeout=60)
            )
            for request in requests
        ]

        async def all_at_the_gate() -> bool:
            return len(await admin.waiting_at_gate()) == CALLS

        await eventually(all_at_the_gate, timeout=30, what="every commit to wait at its gate")
        first_attempts = await admin.waiting_at_gate()
        proxy.cut()

        async def all_retried() -> bool:
            return await _retries_waiting_on_keys(admin) == CALLS

        await eventually(all_retried, timeout=30, what="every call to be retried by the client")
        assert not any(call.done() for call in calls), "a call ended before its commit"
        await gates.aclose()
        async with asyncio.timeout(60):
            answers = await asyncio.gather(*calls)

    async def first_attempts_gone() -> bool:
        running = {row["pid"] for row in await admin.service_backends()}
        return running.isdisjoint(first_attempts)

    await eventually(first_attempts_gone, what="the first attempts to finish their commits")
    for request, ids in zip(requests, answers, strict=True):
        assert len(ids) == EVENTS_PER_CALL
        scenario.ledger.record(
            "publish",
            request.request_id,
            [request],
            grpc.StatusCode.OK,
            event_service_pb2.PublishEventsResponse(ids=ids),
        )
