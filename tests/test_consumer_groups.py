"""Consumer groups: members of one consumer split the feed by subject,
each subject on one member in id order, and a member leaving loses
nothing."""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import AsyncIterator

import grpc
import pytest

from orderstream.events.v1 import event_pb2, event_service_pb2, event_service_pb2_grpc
from service.events import sql
from service.events.groups import PARTITIONS, partition_of
from tests.support.apps import app_with_channel
from tests.support.polling import eventually
from tests.support.requests import unique

pytestmark = pytest.mark.through_pgbouncer

SUBJECTS = 500


class Member:
    """One member's stream: what it received, and its partitions as its
    progress messages tell them. It acknowledges every message."""

    def __init__(
        self, stub: event_service_pb2_grpc.EventServiceStub, consumer: str, kind: str, name: str
    ) -> None:
        self.name = name
        self.received: list[event_pb2.Event] = []
        self.partitions: list[int] = []
        self.members = 0
        request = event_service_pb2.StreamEventsRequest(
            consumer=consumer, member=name, types=[kind], follow=True, progress=True
        )
        self._call = stub.StreamEvents(request, timeout=300)
        self._stub, self.consumer = stub, consumer
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            async for message in self._call:
                if message.events:
                    self.received.extend(message.events)
                    await self._stub.AckEvents(
                        event_service_pb2.AckEventsRequest(
                            consumer=self.consumer,
                            member=self.name,
                            position=message.events[-1].id,
                        )
                    )
                elif message.progress.members:
                    self.partitions = list(message.progress.partitions)
                    self.members = message.progress.members

    async def leave(self) -> None:
        self._call.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            await self._task


@contextlib.asynccontextmanager
async def group(
    stub: event_service_pb2_grpc.EventServiceStub, kind: str, count: int
) -> AsyncIterator[list[Member]]:
    consumer = unique("group")
    members = [Member(stub, consumer, kind, f"member-{n}") for n in range(count)]
    try:
        yield members
    finally:
        for member in members:
            await member.leave()


async def settled(members: list[Member]) -> bool:
    """Every member knows the whole group, and the partitions are split."""
    owned = sorted(p for m in members for p in m.partitions)
    return all(m.members == len(members) for m in members) and owned == list(range(PARTITIONS))


async def publish(stub, kind: str, prefix: str, count: int) -> list[int]:
    ids: list[int] = []
    for start in range(0, count, 1000):
        batch = [
            event_pb2.Event(
                type=kind, source="/tests", subject=f"{prefix}/{n % SUBJECTS}", json_payload="{}"
            )
            for n in range(start, min(count, start + 1000))
        ]
        response = await stub.PublishEvents(event_service_pb2.PublishEventsRequest(events=batch))
        ids.extend(response.ids)
    return ids


def by_subject(events: list[event_pb2.Event]) -> dict[str, list[int]]:
    found: dict[str, list[int]] = defaultdict(list)
    for event in events:
        found[event.subject].append(event.id)
    return found


async def test_the_database_and_python_agree_on_partitions(admin_db):
    """History pages filter partitions in SQL, the tail in Python."""
    subjects = ["", "orders/1", "grouped/42", "ünïcode/€", *(f"s/{n}" for n in range(200))]
    expression = sql.PARTITION_OF_SUBJECT.format(partitions=PARTITIONS)
    rows = await admin_db.fetch(
        f"SELECT subject, {expression} AS partition FROM unnest($1::text[]) AS subject",
        subjects,
    )
    assert {row["subject"]: row["partition"] for row in rows} == {
        subject: partition_of(subject) for subject in subjects
    }


async def test_three_members_split_30000_events_by_subject(service_env):
    kind, prefix = unique("test.grouped"), unique("grouped")
    async with (
        app_with_channel(service_env, ORDERSTREAM_GROUP_MEMBER_TIMEOUT="0.6") as (_, channel),
    ):
        stub = event_service_pb2_grpc.EventServiceStub(channel)
        async with group(stub, kind, 3) as members:
            await eventually(lambda: settled(members), timeout=30, what="the group to settle")
            described = await stub.GetConsumer(
                event_service_pb2.GetConsumerRequest(name=members[0].consumer)
            )
            assert {m.name: list(m.partitions) for m in described.members} == {
                m.name: m.partitions for m in members
            }
            ids = await publish(stub, kind, prefix, 30_000)

            async def all_received() -> bool:
                return sum(len(m.received) for m in members) >= len(ids)

            await eventually(all_received, timeout=120, what="every event to arrive")
    received = [e.id for m in members for e in m.received]
    assert sorted(received) == ids  # every event, none twice
    owners: dict[str, str] = {}
    for member in members:
        assert member.received, "a member got nothing"
        for subject, subject_ids in by_subject(member.received).items():
            assert subject_ids == sorted(subject_ids), f"{subject} out of order"
            assert owners.setdefault(subject, member.name) == member.name, f"{subject} split"
            assert partition_of(subject) in member.partitions
    assert len(owners) == SUBJECTS


async def test_members_on_two_service_processes_split_one_feed(service_env):
    """Membership and positions live in the database: members served by
    different replicas form one group."""
    kind, prefix = unique("test.grouped"), unique("grouped")
    consumer = unique("group")
    async with (
        app_with_channel(service_env, ORDERSTREAM_GROUP_MEMBER_TIMEOUT="0.6") as (_, one),
        app_with_channel(service_env, ORDERSTREAM_GROUP_MEMBER_TIMEOUT="0.6") as (_, other),
    ):
        stubs = [event_service_pb2_grpc.EventServiceStub(c) for c in (one, other)]
        members = [Member(stub, consumer, kind, f"member-{n}") for n, stub in enumerate(stubs)]
        try:
            await eventually(lambda: settled(members), timeout=30, what="the group to settle")
            ids = await publish(stubs[0], kind, prefix, 2000)

            async def all_received() -> bool:
                return sum(len(m.received) for m in members) >= len(ids)

            await eventually(all_received, timeout=60, what="every event to arrive")
        finally:
            for member in members:
                await member.leave()
    assert sorted(e.id for m in members for e in m.received) == ids
    subjects = [set(by_subject(m.received)) for m in members]
    assert subjects[0] and subjects[1] and not subjects[0] & subjects[1]


async def test_a_member_leaving_midway_loses_nothing(service_env):
    kind, prefix = unique("test.grouped"), unique("grouped")
    async with (
        app_with_channel(service_env, ORDERSTREAM_GROUP_MEMBER_TIMEOUT="0.6") as (_, channel),
    ):
        stub = event_service_pb2_grpc.EventServiceStub(channel)
        async with group(stub, kind, 3) as members:
            await eventually(lambda: settled(members), timeout=30, what="the group to settle")
            first = await publish(stub, kind, prefix, 3000)
            leaving, staying = members[2], members[:2]

            async def some_received() -> bool:
                return len(leaving.received) > 0

            await eventually(some_received, timeout=60, what="the leaving member to get events")
            await leaving.leave()
            await eventually(lambda: settled(staying), timeout=30, what="the rest to take over")
            later = await publish(stub, kind, prefix, 3000)

            async def nothing_lost() -> bool:
                got = {e.id for m in members for e in m.received}
                return got >= {*first, *later}

            await eventually(nothing_lost, timeout=120, what="every event to arrive")
    for member in staying:
        # Redelivery after the takeover repeats events, never reorders what
        # is new.
        for subject, subject_ids in by_subject(member.received).items():
            fresh = list(dict.fromkeys(subject_ids))
            assert fresh == sorted(fresh), f"{subject} out of order on {member.name}"
