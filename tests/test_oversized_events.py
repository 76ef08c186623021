"""Events whose stored payload is over the payload limit (rows from before
migration 0004, whose CHECK is NOT VALID, or written behind the service's
back) keep their place in the feed: readers get every other field and
`omitted_payload_bytes` instead of the payload, and go on."""

from __future__ import annotations

import asyncio
import json

import grpc

from devcluster.cluster import Cluster
from orderstream.events.v1 import event_pb2, event_service_pb2, event_service_pb2_grpc
from service.events.payload import MAX_PAYLOAD_BYTES
from tests.support.apps import running_app
from tests.support.database import connect_to

# 10 numbers of 131072 digits each once jsonb writes them out: 1.25 MiB.
OVERSIZED = '{"x": [' + ", ".join(["1e131071"] * 10) + "]}"

# As an operator would: the CHECK dropped and added again (NOT VALID, as
# 0004 adds it) around the insert, in one transaction, so no other writer
# ever sees the table without it.
WRITE_BEHIND_THE_BACK = [
    "ALTER TABLE events DROP CONSTRAINT events_payload_size",
    """
    INSERT INTO events (type, source, subject, time, payload)
    VALUES ('com.example.huge', '/tests/oversized', 'things/big', now(), $1::jsonb)
    """,
    "ALTER TABLE events ADD CONSTRAINT events_payload_size "
    "CHECK (payload_bytes <= 1048576) NOT VALID",
]


def published(n: int) -> event_service_pb2.PublishEventsRequest:
    return event_service_pb2.PublishEventsRequest(
        events=[
            event_pb2.Event(
                type="com.example.small",
                source="/tests/oversized",
                json_payload=json.dumps({"n": n}),
            )
        ]
    )


async def test_an_oversized_row_keeps_its_place_and_never_wedges_a_reader(
    pg_cluster: Cluster, fresh_database: str, service_env: dict[str, str]
):
    env = {**service_env, "DATABASE_URL": pg_cluster.dsn(database=fresh_database)}
    async with (
        running_app(env) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel,
        connect_to(pg_cluster, fresh_database, admin=True) as admin,
    ):
        events = event_service_pb2_grpc.EventServiceStub(channel)
        follower = events.StreamEvents(event_service_pb2.StreamEventsRequest(follow=True))
        received: list[event_pb2.Event] = []

        async def follow(count: int) -> None:
            while len(received) < count:
                response = await follower.read()
                assert response is not grpc.aio.EOF
                received.extend(response.events)

        try:
            (first,) = (await events.PublishEvents(published(1))).ids
            async with admin.transaction():
                await admin.execute(WRITE_BEHIND_THE_BACK[0])
                await admin.execute(WRITE_BEHIND_THE_BACK[1], OVERSIZED)
                await admin.execute(WRITE_BEHIND_THE_BACK[2])
            big, size = await admin.fetchrow(
                "SELECT id, payload_bytes FROM events WHERE type = 'com.example.huge'"
            )
            assert size > MAX_PAYLOAD_BYTES
            (last,) = (await events.PublishEvents(published(3))).ids
            assert first < big < last

            got = await events.GetEvent(event_service_pb2.GetEventRequest(id=big))
            assert got.WhichOneof("payload") is None
            assert got.omitted_payload_bytes == size
            assert (got.type, got.subject) == ("com.example.huge", "things/big")
            assert got.time.seconds > 0
            small = await events.GetEvent(event_service_pb2.GetEventRequest(id=first))
            assert (small.json_payload, small.omitted_payload_bytes) == ('{"n": 1}', 0)

            history = [
                e
                async for response in events.StreamEvents(
                    event_service_pb2.StreamEventsRequest(), timeout=10
                )
                for e in response.events
            ]
            assert [e.id for e in history] == [first, big, last]
            assert [e.omitted_payload_bytes for e in history] == [0, size, 0]
            assert [e.json_payload for e in history] == ['{"n": 1}', "", '{"n": 3}']
            assert history[1] == got

            # The follower went past it, and goes on.
            (more,) = (await events.PublishEvents(published(4))).ids
            await asyncio.wait_for(follow(4), 10)
            assert [e.id for e in received] == [first, big, last, more]
            assert received[1] == got
        finally:
            follower.cancel()
