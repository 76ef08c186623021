"""The change feed under fan-out: many follow streams on one service process.

    python -m bench.fanout [--followers 1,100,1000] [--rate 200] [--seconds 10]

One `python -m service serve` process on a durable cluster, as deployed
(pool of 10, ORDERSTREAM_MAX_FOLLOWERS raised to the largest step). A writer
publishes `--rate` events/s, one PublishEvents call per event, each event's
payload carrying its send time (CLOCK_MONOTONIC, which every process on the
machine shares). For each step, N followers (StreamEvents follow=true from
the current end, each reading every event) run in one load-generator
process written in Go (bench/followers/main.go, built here with Debian's
golang-go and grpc-go), over `--channels` connections: a Python client spent
about 0.8 of a core receiving for 1,000 followers, CPU the measured service
then lacked, where in production followers run elsewhere. Once every follower has received an
event and `--warmup` has passed, a step has two phases of `--seconds`:

1. writer + followers: delivery lag (from the writer reading the
   PublishEvents acknowledgement to the follower receiving the event; an
   event a follower receives before its publisher reads the acknowledgement
   counts 0; the event's commit lies between the call and its
   acknowledgement, so the p99 is also printed from the call, a bound
   from above), the service's database connections (pg_stat_activity,
   application_name 'orderstream': all of them, and those not idle apart
   from the writer's INSERT: the followers' own), sampled every 50 ms;
2. writer + followers + GetOrder from h2load (16 concurrent): its calls/s,
   as a ratio to the first step, which has no followers (0), and the
   delivery lag beside it (the feed's rounds come further apart while
   other work keeps the event loop busy, service/events/pacing.py).

The service's VmRSS is sampled throughout. Prints a table per step and the
issue's targets PASS/FAIL (with the largest step), writes
bench/results/fanout.json. A follower refused (RESOURCE_EXHAUSTED) retries
from the last id it saw after 100 ms; the refusals are counted and shown.
No CPU pinning: service, PostgreSQL and clients share the machine.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import json
import os
import ssl
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import grpc

from bench import h2load
from bench.grpc_load import line_items
from bench.grpc_wire import write_frame
from bench.h2load import percentile
from bench.harness import ServiceProcess, cluster, save, service
from devcluster.cluster import Cluster
from orderstream.events.v1 import event_pb2, event_service_pb2, event_service_pb2_grpc
from orderstream.orders.v1 import order_service_pb2, order_service_pb2_grpc

GET_ORDER = "/orderstream.orders.v1.OrderService/GetOrder"
GET_CONCURRENCY = 16
POOL_MAX = 10  # the default pool; targets are judged as deployed
RETRY_AFTER = 0.1  # a refused follower's wait before it asks again
LIVE_TIMEOUT = 60.0  # for every follower to receive its first event
DRAIN_TIMEOUT = 60.0  # for every follower to receive the last event

TARGETS = {
    "get_vs_none": 0.8,  # GetOrder beside the largest step / with no followers, at least
    "lag_p99_ms": 100.0,  # at most
    "follower_connections": 2,  # at most, per process
    "rss_mib": 256.0,  # at most
}


# -- the followers: a Go load generator (bench/followers/main.go) ------------

FOLLOWERS_SOURCE = Path(__file__).parent / "followers"
GO_ENV = {"GOPATH": "/usr/share/gocode", "GO111MODULE": "off"}  # Debian's Go packages


def build_followers(into: Path) -> Path:
    """Builds the load generator with Debian's golang-go and grpc-go
    (`make bench` installs them); Go's build cache makes a rebuild quick."""
    binary = into / "followers"
    subprocess.run(
        ["go", "build", "-o", str(binary), "."],
        cwd=FOLLOWERS_SOURCE,
        env={**os.environ, **GO_ENV},
        check=True,
    )
    return binary


class Followers:
    """One load-generator process holding `count` follow streams."""

    def __init__(
        self, binary: Path, port: int, count: int, channels: int, after: int, capacity: int
    ):
        self._process = subprocess.Popen(
            [
                str(binary),
                f"-addr=127.0.0.1:{port}",
                f"-count={count}",
                f"-channels={channels}",
                f"-after={after}",
                f"-capacity={capacity}",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    async def line(self) -> str:
        assert self._process.stdout is not None
        text = await asyncio.to_thread(self._process.stdout.readline)
        if not text:
            raise RuntimeError(f"the followers exited ({self._process.wait()})")
        return text.strip()

    async def collect(
        self, lo: int, hi: int, last: int, acks: array.array, scratch: Path
    ) -> dict[str, Any]:
        acks_path, lags_path = scratch / "acks.bin", scratch / "lags.bin"
        acks_path.write_bytes(acks.tobytes())
        assert self._process.stdin is not None
        self._process.stdin.write(f"collect {lo} {hi} {last} {acks_path} {lags_path}\n")
        self._process.stdin.flush()
        summary = json.loads(await self.line())
        lags = array.array("d")
        lags.frombytes(lags_path.read_bytes())
        return {**summary, "lags": lags}

    def stop(self) -> None:
        if self._process.poll() is None:
            self._process.kill()
        self._process.wait()


# -- the step ------------------------------------------------------------------


@dataclass
class Writer:
    """Publishes `rate` events/s, one call each, one call in flight; records
    the acknowledgement time by offset (id - after)."""

    stub: event_service_pb2_grpc.EventServiceStub
    after: int
    capacity: int
    rate: float
    acks: array.array = field(init=False)
    calls: array.array = field(init=False)  # when each call was made, by offset
    last: int = 0
    failed: int = 0
    stop: bool = False

    def __post_init__(self) -> None:
        self.acks = array.array("d", bytes(8 * self.capacity))
        self.calls = array.array("d", bytes(8 * self.capacity))

    async def run(self) -> None:
        start = time.monotonic()
        n = 0
        while not self.stop:
            due = start + n / self.rate
            if (wait := due - time.monotonic()) > 0:
                await asyncio.sleep(wait)
            n += 1
            sent = time.monotonic()
            event = event_pb2.Event(
                type="bench.fanout",
                source="/bench",
                subject=f"fanout/{n}",
                json_payload=json.dumps({"n": n, "sent_monotonic": sent}),
            )
            try:
                response = await self.stub.PublishEvents(
                    event_service_pb2.PublishEventsRequest(events=[event]), timeout=10
                )
            except grpc.aio.AioRpcError:
                self.failed += 1
                continue
            offset = response.ids[0] - self.after
            if offset >= self.capacity:
                raise RuntimeError("more events than the step's capacity")
            self.acks[offset] = time.monotonic()
            self.calls[offset] = sent
            self.last = max(self.last, offset)


def split_lags(
    values: array.array, phase: int, before: list[float]
) -> tuple[list[float], list[float], list[float]]:
    """The followers' lags (`len(before)` offsets each, in turn), sorted:
    of the first `phase` offsets, of the rest, and of the first `phase`
    again counted from the call instead of its acknowledgement (`before`:
    by offset, how long before the acknowledgement the call was made).
    Offsets without an event (-1) and events not received (NaN, counted as
    missing) are left out."""
    first: list[float] = []
    rest: list[float] = []
    from_call: list[float] = []
    width = len(before)
    for start in range(0, len(values), width):
        for offset, lag in enumerate(values[start : start + width]):
            if not lag >= 0:  # True for NaN
                continue
            if offset < phase:
                first.append(lag)
                from_call.append(lag + before[offset])
            else:
                rest.append(lag)
    return sorted(first), sorted(rest), sorted(from_call)


@dataclass
class Samples:
    rss_kib: list[int] = field(default_factory=list)
    connections: list[int] = field(default_factory=list)
    follower_connections: list[int] = field(default_factory=list)


CONNECTIONS = """
SELECT count(*),
       count(*) FILTER (WHERE state <> 'idle' AND query NOT ILIKE '%events_publish%')
FROM pg_stat_activity WHERE application_name = 'orderstream'
"""


async def sample(
    server: ServiceProcess, admin: asyncpg.Connection, into: Samples, connections: bool
) -> None:
    while True:
        into.rss_kib.append(server.rss_kib())
        if connections:
            total, busy = await admin.fetchrow(CONNECTIONS)
            into.connections.append(total)
            into.follower_connections.append(busy)
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def sampling(
    server: ServiceProcess, admin: asyncpg.Connection, connections: bool
) -> AsyncIterator[Samples]:
    samples = Samples()
    task = asyncio.create_task(sample(server, admin, samples, connections))
    try:
        yield samples
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def step(
    server: ServiceProcess,
    admin: asyncpg.Connection,
    args: argparse.Namespace,
    followers: int,
    get_frame: Path,
    binary: Path,
) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = event_service_pb2_grpc.EventServiceStub(channel)
        marker = await stub.PublishEvents(
            event_service_pb2.PublishEventsRequest(
                events=[
                    event_pb2.Event(type="bench.fanout.start", source="/bench", json_payload="{}")
                ]
            )
        )
        after = marker.ids[0]
        total_seconds = args.warmup + 2 * args.seconds + LIVE_TIMEOUT
        capacity = int(args.rate * total_seconds * 1.2) + 100
        clients = (
            Followers(binary, server.port, followers, args.channels, after, capacity)
            if followers
            else None
        )
        try:
            live = 0
            if clients:
                await clients.line()  # "opened"
            writer = Writer(stub, after, capacity, args.rate)
            writing = asyncio.create_task(writer.run())
            if clients:
                live = int((await clients.line()).split()[1])  # "live N"
            await asyncio.sleep(args.warmup)
            lo = writer.last + 1
            async with sampling(server, admin, connections=True) as alone:
                await asyncio.sleep(args.seconds)
            hi = writer.last + 1
            async with sampling(server, admin, connections=False) as loaded:
                get = await asyncio.to_thread(
                    h2load.run,
                    server.port,
                    GET_ORDER,
                    get_frame,
                    concurrency=GET_CONCURRENCY,
                    seconds=args.seconds,
                    warmup=1.0,
                    cpus="0,1",
                )
            writer.stop = True
            await writing
            end = writer.last + 1
            result: dict[str, Any] = {
                "lags": array.array("d"),
                "missing": 0,
                "refused": 0,
                "ended": {},
            }
            if clients:
                result = await clients.collect(lo, end, writer.last, writer.acks, binary.parent)
        finally:
            if clients:
                clients.stop()
    # The commit lies between the call and its acknowledgement: the lag from
    # the acknowledgement (judged) is at most that much shorter than from the
    # commit, the lag from the call at most that much longer.
    before = [writer.acks[n] - writer.calls[n] for n in range(lo, end)]
    lags, busy_lags, from_call = split_lags(result["lags"], hi - lo, before)
    rss = alone.rss_kib + loaded.rss_kib
    return {
        "followers": followers,
        "live": live,
        "refused": result["refused"],
        "ended": result["ended"],
        "missing": result["missing"],
        "events_published": hi - lo,
        "publish_failed": writer.failed,
        "lag_p50_ms": percentile(lags, 0.50) * 1000 if lags else None,
        "lag_p99_ms": percentile(lags, 0.99) * 1000 if lags else None,
        "lag_from_call_p99_ms": percentile(from_call, 0.99) * 1000 if from_call else None,
        "busy_lag_p50_ms": percentile(busy_lags, 0.50) * 1000 if busy_lags else None,
        "busy_lag_p99_ms": percentile(busy_lags, 0.99) * 1000 if busy_lags else None,
        "rss_mib_max": max(rss) / 1024,
        "connections_max": max(alone.connections),
        "follower_connections_max": max(alone.follower_connections),
        "get_order": get.as_dict(),
    }


# -- the run -------------------------------------------------------------------


async def seed_order(port: int) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        orders = order_service_pb2_grpc.OrderServiceStub(channel)
        created = await orders.CreateOrder(
            order_service_pb2.CreateOrderRequest(
                request_id=f"fanout-{time.time_ns()}",
                customer_id="c-1",
                currency="EUR",
                items=line_items(),
            )
        )
        await orders.GetOrder(order_service_pb2.GetOrderRequest(id=created.id), timeout=10)
    return int(created.id)


async def measure(db: Cluster, args: argparse.Namespace) -> dict[str, Any]:
    steps = [0, *args.followers]
    env = {
        "ORDERSTREAM_POOL_MAX_SIZE": str(POOL_MAX),
        "ORDERSTREAM_MAX_FOLLOWERS": str(max(1000, *steps)),
    }
    admin = await asyncpg.connect(
        db.dsn(admin=True), ssl=ssl.create_default_context(cafile=str(db.certificates.ca_cert))
    )
    try:
        async with service(db, **env) as server:
            order_id = await seed_order(server.port)
            baseline_kib = server.rss_kib()
            with tempfile.TemporaryDirectory() as scratch:
                binary = build_followers(Path(scratch))
                frame = write_frame(
                    order_service_pb2.GetOrderRequest(id=order_id), Path(scratch) / "get.bin"
                )
                figures = []
                for followers in steps:
                    figures.append(await step(server, admin, args, followers, frame, binary))
                    print(row(figures[-1], figures[0]), flush=True)
    finally:
        await admin.close()
    none = figures[0]["get_order"]["rps"]
    for f in figures:
        f["get_vs_none"] = f["get_order"]["rps"] / none if none else 0.0
    return {
        "rate": args.rate,
        "seconds": args.seconds,
        "channels": args.channels,
        "settings": env,
        "rss_mib_at_start": baseline_kib / 1024,
        "steps": figures,
        "checks": checks(figures),
    }


def checks(figures: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The issue's targets, judged on the largest step."""
    top = figures[-1]
    none = figures[0]["get_order"]["rps"]
    lag = top["lag_p99_ms"]
    found = {
        "get_vs_none": (top["get_order"]["rps"] / none if none else 0.0, ">="),
        "lag_p99_ms": (float("inf") if lag is None else lag, "<="),
        "follower_connections": (top["follower_connections_max"], "<="),
        "rss_mib": (max(f["rss_mib_max"] for f in figures), "<="),
    }
    out = {}
    for key, (value, sense) in found.items():
        bound = TARGETS[key]
        met = value >= bound if sense == ">=" else value <= bound
        # Every follower served and every event delivered, or no PASS at all.
        if key == "lag_p99_ms":
            met = met and top["missing"] == 0 and top["live"] == top["followers"]
        out[key] = {"value": value, "target": f"{sense} {bound:g}", "met": met}
    return out


HEADER = (
    "| followers | live | refused | lag p50 / p99 ms (p99 from the call) | service RSS MiB (max) "
    "| DB conns: all / followers' (max) | GetOrder calls/s | / none "
    "| lag p50 / p99 ms beside GetOrder |"
)
RULE = "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"


def row(f: dict[str, Any], first: dict[str, Any]) -> str:
    lag = (
        "-"
        if f["lag_p50_ms"] is None
        else f"{f['lag_p50_ms']:.1f} / {f['lag_p99_ms']:.1f} ({f['lag_from_call_p99_ms']:.1f})"
        + (f" ({f['missing']:,} missing)" if f["missing"] else "")
    )
    busy_lag = (
        "-"
        if f["busy_lag_p50_ms"] is None
        else f"{f['busy_lag_p50_ms']:.1f} / {f['busy_lag_p99_ms']:.1f}"
    )
    none = first["get_order"]["rps"]
    ratio = f["get_order"]["rps"] / none if none else 0.0
    failed = f" ({f['get_order']['failed']:,} failed)" if f["get_order"]["failed"] else ""
    return (
        f"| {f['followers']:,} | {f['live']:,} | {f['refused']:,} | {lag} "
        f"| {f['rss_mib_max']:.0f} | {f['connections_max']} / {f['follower_connections_max']} "
        f"| {f['get_order']['rps']:,.0f}{failed} | {ratio:.2f} | {busy_lag} |"
    )


def table(results: dict[str, Any]) -> list[str]:
    first = results["steps"][0]
    lines = [HEADER, RULE]
    lines += [row(f, first) for f in results["steps"]]
    lines += ["", "| target (largest step) | measured | target | |", "|---|---:|---:|---|"]
    for key, check in results["checks"].items():
        verdict = "PASS" if check["met"] else "FAIL"
        lines.append(f"| {key} | {check['value']:.2f} | {check['target']} | {verdict} |")
    return lines


def followers_list(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("a comma-separated list of follower counts >= 1")
    return values


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--followers", type=followers_list, default=[1, 100, 1000])
    parser.add_argument("--rate", type=float, default=200.0, help="events/s published")
    parser.add_argument("--seconds", type=float, default=10.0, help="per phase of each step")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--channels", type=int, default=4, help="connections the followers share")
    args = parser.parse_args()
    print(HEADER)
    print(RULE, flush=True)
    with cluster() as db:
        results = asyncio.run(measure(db, args))
    print("\n".join(table(results)[len(results["steps"]) + 2 :]))
    path = save("fanout", results)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
