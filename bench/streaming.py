"""Bulk data through orderstream against PostgreSQL's own COPY, one run.

    python -m bench.streaming [--events 1000000] [--rss-events 2000000]

On one data set (events with a small JSON payload) it measures `psql \\copy`
in and out (the database's own limit), UploadEvents end to end over gRPC
(request messages built before the clock starts), StreamEvents to a client
that parses every message (copy out and stream: medians of alternating
rounds on the same vacuumed table), and the service process's peak RSS
growth during a large upload and a large stream. Prints a table with the ratios against
the targets and writes bench/results/streaming.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import grpc

from bench.harness import ServiceProcess, cluster, libpq_env, save, service
from devcluster.cluster import Cluster
from orderstream.events.v1 import event_pb2, event_service_pb2, event_service_pb2_grpc

EVENTS_PER_MESSAGE = 1000
ROUNDS = 3  # of `psql \\copy` out and StreamEvents, alternating
COPY_OUT = "\\copy (SELECT id, type, source, subject, time, payload FROM events) TO '/dev/null'"
MAX_MESSAGE = 64 << 20

TARGETS = {
    "upload_vs_copy_in": 0.7,
    "stream_vs_copy_out": 0.5,
}
RSS_LIMIT_MIB = 64


def payload(n: int) -> str:
    return json.dumps({"order_id": n, "amount_cents": 1299 + n % 500, "currency": "EUR"})


def copy_file(count: int, directory: Path) -> Path:
    """The same rows psql and the upload send, as COPY text."""
    path = directory / "events.copy"
    with path.open("w") as out:
        for n in range(count):
            out.write(
                f"bench.order_paid\t/bench\torders/{n}\t2026-11-24 10:00:00+00\t{payload(n)}\n"
            )
    os.chmod(directory, 0o755)
    os.chmod(path, 0o644)
    return path


def psql(db: Cluster, command: str) -> float:
    """Runs one psql meta-command over verified TLS; returns seconds."""
    started = time.perf_counter()
    subprocess.run(["psql", "-X", "-q", db.dsn(), "-c", command], env=libpq_env(db), check=True)
    return time.perf_counter() - started


def upload_messages(count: int, first: int = 0) -> list[event_service_pb2.UploadEventsRequest]:
    upload_id = f"bench-{time.time_ns()}"
    messages = []
    for start in range(first, first + count, EVENTS_PER_MESSAGE):
        message = event_service_pb2.UploadEventsRequest(upload_id=upload_id)
        for n in range(start, min(start + EVENTS_PER_MESSAGE, first + count)):
            message.events.append(
                event_pb2.Event(
                    type="bench.order_paid",
                    source="/bench",
                    subject=f"orders/{n}",
                    json_payload=payload(n),
                )
            )
        messages.append(message)
    return messages


def channel(server: ServiceProcess) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(
        f"127.0.0.1:{server.port}",
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
        ],
    )


async def upload(server: ServiceProcess, messages: list) -> tuple[float, int]:
    async with channel(server) as chan:
        stub = event_service_pb2_grpc.EventServiceStub(chan)
        started = time.perf_counter()
        response = await stub.UploadEvents(iter(messages))
        return time.perf_counter() - started, response.event_count


async def stream(server: ServiceProcess, after_id: int = 0) -> tuple[float, int]:
    async with channel(server) as chan:
        stub = event_service_pb2_grpc.EventServiceStub(chan)
        count = 0
        started = time.perf_counter()
        async for response in stub.StreamEvents(
            event_service_pb2.StreamEventsRequest(after_id=after_id)
        ):
            count += len(response.events)  # deserialised: every message parsed
        return time.perf_counter() - started, count


def rate(rows: int, seconds: float) -> float:
    return rows / seconds if seconds else 0.0


async def measure(n: int, big: int) -> tuple[dict[str, float], dict[str, list[float]]]:
    """The figures, and the rounds their medians come from. psql runs in a
    thread while a service runs, so the service's log keeps being read."""
    figures: dict[str, float] = {}
    with cluster() as db, tempfile.TemporaryDirectory() as scratch:
        async with service(db):
            pass  # applies migrations
        data = copy_file(n, Path(scratch))
        columns = "events (type, source, subject, time, payload)"
        figures["copy_in_rows_s"] = rate(n, psql(db, f"\\copy {columns} FROM '{data}'"))
        # Before any read: the first scan after a bulk load sets every row's
        # hint bits (writes), which would slow whichever reader came first.
        psql(db, "VACUUM ANALYZE events")

        async with service(db) as server:
            # Alternating rounds on the same table; the medians are compared,
            # so one round disturbed by the machine decides nothing.
            copy_out, streamed = [], []
            for _ in range(ROUNDS):
                copy_out.append(rate(n, await asyncio.to_thread(psql, db, COPY_OUT)))
                seconds, count = await stream(server)
                assert count == n, count
                streamed.append(rate(n, seconds))
            figures["copy_out_rows_s"] = statistics.median(copy_out)
            figures["stream_rows_s"] = statistics.median(streamed)
            rounds = {"copy_out_rows_s": copy_out, "stream_rows_s": streamed}
            messages = upload_messages(n)
            seconds, count = await upload(server, messages)
            assert count == n, count
            figures["upload_rows_s"] = rate(n, seconds)
            del messages

        # Peak RSS growth: a fresh process per measurement, so its high-water
        # mark belongs to that one operation.
        messages = upload_messages(big)
        async with service(db) as server:
            baseline = server.rss_kib()
            seconds, count = await upload(server, messages)
            assert count == big
            figures["upload_big_rows_s"] = rate(big, seconds)
            figures["upload_rss_growth_mib"] = (server.peak_rss_kib() - baseline) / 1024
        del messages
        async with service(db) as server:
            baseline = server.rss_kib()
            seconds, count = await stream(server, after_id=2 * n)
            assert count == big, count
            figures["stream_big_rows_s"] = rate(big, seconds)
            figures["stream_rss_growth_mib"] = (server.peak_rss_kib() - baseline) / 1024
    return figures, rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--rss-events", type=int, default=2_000_000)
    args = parser.parse_args()
    n, big = args.events, args.rss_events
    figures, rounds = asyncio.run(measure(n, big))

    ratios = {
        "upload_vs_copy_in": figures["upload_rows_s"] / figures["copy_in_rows_s"],
        "stream_vs_copy_out": figures["stream_rows_s"] / figures["copy_out_rows_s"],
    }
    report(n, big, figures, ratios, rounds)
    path = save(
        "streaming",
        {
            "events": n,
            "rss_events": big,
            "cpu_placement": "unpinned: client, service and PostgreSQL share both cores",
            "figures": figures,
            "rounds": rounds,
            "ratios": ratios,
            "targets": {**TARGETS, "rss_growth_mib_max": RSS_LIMIT_MIB},
        },
    )
    print(f"\nraw results: {path}")


def report(
    n: int,
    big: int,
    figures: dict[str, float],
    ratios: dict[str, float],
    rounds: dict[str, list[float]],
) -> None:
    def verdict(ok: bool) -> str:
        return "meets target" if ok else "BELOW TARGET"

    print(f"\nstreaming benchmark, {n:,} events (RSS runs: {big:,})\n")
    print(f"{'what':<34}{'rows/s':>12}")
    for key, label in [
        ("copy_in_rows_s", "psql \\copy in (database limit)"),
        ("upload_rows_s", "UploadEvents over gRPC"),
        ("copy_out_rows_s", "psql \\copy out (database limit)"),
        ("stream_rows_s", "StreamEvents over gRPC"),
        ("upload_big_rows_s", f"UploadEvents, {big:,} rows"),
        ("stream_big_rows_s", f"StreamEvents, {big:,} rows"),
    ]:
        print(f"{label:<34}{figures[key]:>12,.0f}")
    print(f"\n(copy out and stream: the medians of {ROUNDS} alternating rounds)")
    for key, label in [("copy_out_rows_s", "psql \\copy out"), ("stream_rows_s", "StreamEvents")]:
        print(f"  {label:<32}" + "".join(f"{value:>12,.0f}" for value in rounds[key]))
    print()
    for key, target in TARGETS.items():
        print(
            f"{key:<34}{ratios[key]:>12.2f}  target >= {target}  {verdict(ratios[key] >= target)}"
        )
    for key in ("upload_rss_growth_mib", "stream_rss_growth_mib"):
        value = figures[key]
        print(
            f"{key:<34}{value:>12.1f}  target <= {RSS_LIMIT_MIB}  {verdict(value <= RSS_LIMIT_MIB)}"
        )


if __name__ == "__main__":
    main()
