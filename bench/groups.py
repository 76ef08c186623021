"""Consumer groups against a single follower: how fast a backlog is consumed.

    python -m bench.groups [--events 200000] [--subjects 2000] [--members 3]

One `python -m service serve` process on a throwaway durable cluster, as
deployed. `--events` events in `--subjects` subjects are uploaded first
(UploadEvents). Then a fresh durable consumer consumes all of them from the
start, following, twice:

1. a single follower: one stream, no member name;
2. a group: `--members` member streams of one consumer, each on its own
   channel, started together (they settle on their partitions within a
   third of the member timeout, 1.5 s here; events read twice meanwhile
   are counted once).

Every stream acknowledges each message it receives (AckEvents), as a
consumer would. The rate is the distinct events received over the seconds
from the first stream opening to the last event arriving. Client, service
and PostgreSQL share the machine (no CPU pinning); the client parses every
message, as a real consumer does. Writes bench/results/groups.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time

import grpc

from bench.harness import cluster, save, service
from orderstream.client import upload_events
from orderstream.events.v1 import event_pb2, event_service_pb2, event_service_pb2_grpc

KIND = "bench.grouped"
MEMBER_TIMEOUT = "1.5"


async def load(port: int, events: int, subjects: int) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        await upload_events(
            channel,
            (
                event_pb2.Event(
                    type=KIND, source="/bench", subject=f"s/{n % subjects}", json_payload="{}"
                )
                for n in range(events)
            ),
        )


async def consume(port: int, consumer: str, members: list[str], events: int) -> tuple[float, int]:
    """Seconds until `members` (one empty name: a single follower) have
    received every event between them, and how many they received in all
    (a group's members read some twice while they settle)."""
    seen: set[int] = set()
    received = 0
    done = asyncio.Event()

    async def member(name: str) -> None:
        nonlocal received
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = event_service_pb2_grpc.EventServiceStub(channel)
            request = event_service_pb2.StreamEventsRequest(
                consumer=consumer, member=name, types=[KIND], follow=True
            )
            call = stub.StreamEvents(request)
            try:
                async for message in call:
                    if not message.events:
                        continue
                    seen.update(e.id for e in message.events)
                    received += len(message.events)
                    await stub.AckEvents(
                        event_service_pb2.AckEventsRequest(
                            consumer=consumer, member=name, position=message.events[-1].id
                        )
                    )
                    if len(seen) >= events:
                        done.set()
            finally:
                call.cancel()

    started = time.perf_counter()
    tasks = [asyncio.create_task(member(name)) for name in members]
    await done.wait()
    seconds = time.perf_counter() - started
    for task in tasks:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            await task
    return seconds, received


async def measure(events: int, subjects: int, members: int) -> dict[str, float]:
    with cluster() as db:
        async with service(db, ORDERSTREAM_GROUP_MEMBER_TIMEOUT=MEMBER_TIMEOUT) as server:
            await load(server.port, events, subjects)
            single, _ = await consume(server.port, "bench-single", [""], events)
            names = [f"member-{n}" for n in range(members)]
            grouped, received = await consume(server.port, "bench-group", names, events)
    return {
        "single_follower_events_s": events / single,
        "group_events_s": events / grouped,
        "group_vs_single": single / grouped,
        "group_received_per_event": received / events,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--subjects", type=int, default=2_000)
    parser.add_argument("--members", type=int, default=3)
    args = parser.parse_args()
    figures = asyncio.run(measure(args.events, args.subjects, args.members))
    print(f"consumer group throughput ({args.events} events, {args.subjects} subjects)")
    print(f"  single follower        {figures['single_follower_events_s']:>10,.0f} events/s")
    print(f"  group of {args.members} members     {figures['group_events_s']:>10,.0f} events/s")
    print(f"  group / single         {figures['group_vs_single']:>10.2f}")
    print(f"  group received/event   {figures['group_received_per_event']:>10.2f}")
    path = save(
        "groups",
        {
            "events": args.events,
            "subjects": args.subjects,
            "members": args.members,
            "cpu_placement": "unpinned: client, service and PostgreSQL share the machine",
            "figures": figures,
        },
    )
    print(f"\nraw results: {path}")


if __name__ == "__main__":
    main()
