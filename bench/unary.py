"""Unary calls through orderstream against the framework's ceiling, the
database's own limit and the synchronous peer, in one run.

    python -m bench.unary [--seconds 4] [--warmup 1]

On one durable cluster it measures, at 1, 16 and 64 concurrent requests:
the ceiling (bench/ceiling_server.py: bare grpc.aio, no database, the same
response messages), orderstream and the peer (bench/peer_server.py:
psycopg 3 + sync grpc) on GetOrder, CreateOrder (3 items) and ListOrders
(page of 50), and `pgbench -S -M prepared`; then one PublishEvents call per
event against one UploadEvents stream of the same events, and `--workers 2`
against one worker on GetOrder. Prints the figures and the ratios against
the targets, writes bench/results/unary.json and bench/results/unary.png.

Load: h2load with a prepared gRPC frame, except CreateOrder (every call needs
its own request_id: bench/grpc_load.py) and UploadEvents (client streaming);
the run measures both Python clients against the ceiling to show they are
not the limit. CPU placement: each server process on CPU 0, PostgreSQL and
the load generator on CPU 1, except the workers comparison, where servers,
PostgreSQL and h2load all share both CPUs (two workers need both).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc

from bench import h2load
from bench.chart import draw
from bench.grpc_load import line_items
from bench.grpc_wire import write_frame
from bench.harness import (
    RESULTS,
    ServiceProcess,
    cluster,
    libpq_env,
    machine,
    pin,
    postgres_pids,
    process_tree,
    save,
    serve_argv,
    served,
    service_env,
)
from bench.streaming import upload_messages
from devcluster.cluster import Cluster
from orderstream.events.v1 import event_pb2, event_service_pb2, event_service_pb2_grpc
from orderstream.orders.v1 import order_pb2, order_service_pb2, order_service_pb2_grpc

CONCURRENCY = (1, 16, 64)
HEADLINE = 16  # the concurrency the targets are judged at
SERVER_CPU, CLIENT_CPU, ALL_CPUS = "0", "1", "0,1"
POOL_SIZE = 16  # orderstream's pool = the peer's pool = the peer's threads
UPLOAD_EVENTS = 200_000

ORDERS = "/orderstream.orders.v1.OrderService/"
EVENTS = "/orderstream.events.v1.EventService/"
METHODS = ("GetOrder", "CreateOrder", "ListOrders")
SERVERS = ("ceiling", "orderstream", "peer")

# Issue 17's targets: (bound, sense), judged against the ceiling and the
# peer measured in the same run.
TARGETS: dict[str, tuple[float, str]] = {
    "get_vs_peer_16": (1.2, ">="),
    "get_vs_peer_64": (1.2, ">="),
    "get_vs_ceiling_16": (0.75, ">="),
    "list_vs_peer_16": (1.1, ">="),
    "list_vs_peer_64": (1.1, ">="),
    "create_vs_peer_16": (1.1, ">="),
    "create_vs_peer_64": (1.1, ">="),
    "get_p99_vs_peer_16": (1.0, "<="),
    "get_p50_vs_peer_1": (1.0, "<="),
    "upload_vs_publish": (30.0, ">="),
}
LABELS = {
    "get_vs_peer_16": "GetOrder / peer at 16",
    "get_vs_peer_64": "GetOrder / peer at 64",
    "get_vs_ceiling_16": "GetOrder / ceiling at 16",
    "list_vs_peer_16": "ListOrders / peer at 16",
    "list_vs_peer_64": "ListOrders / peer at 64",
    "create_vs_peer_16": "CreateOrder / peer at 16",
    "create_vs_peer_64": "CreateOrder / peer at 64",
    "get_p99_vs_peer_16": "GetOrder p99 / peer's at 16",
    "get_p50_vs_peer_1": "GetOrder p50 / peer's at 1",
    "upload_vs_publish": "UploadEvents / PublishEvents per event",
}
UNTARGETED = {
    "workers2_vs_1": "--workers 2 / 1 on GetOrder at 16",
    "get_vs_round_trip": "GetOrder / ceiling + one SELECT 1 at 16",
}


def orderstream_env(db: Cluster) -> dict[str, str]:
    return service_env(
        db,
        ORDERSTREAM_PAGE_TOKEN_KEY=secrets.token_urlsafe(32),
        ORDERSTREAM_POOL_MIN_SIZE=str(POOL_SIZE),
        ORDERSTREAM_POOL_MAX_SIZE=str(POOL_SIZE),
    )


async def seed(port: int, count: int) -> dict[str, bytes]:
    """Creates `count` orders of 3 items; returns one response of each method,
    serialised, for the ceiling to answer with."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        orders = order_service_pb2_grpc.OrderServiceStub(channel)
        created = await asyncio.gather(
            *(
                orders.CreateOrder(
                    order_service_pb2.CreateOrderRequest(
                        request_id=f"seed-{n}",
                        customer_id=f"c-{n % 10}",
                        currency="EUR",
                        items=line_items(),
                    )
                )
                for n in range(count)
            )
        )
        got = await orders.GetOrder(order_service_pb2.GetOrderRequest(id=created[0].id))
        page = await orders.ListOrders(order_service_pb2.ListOrdersRequest(page_size=50))
    assert len(page.orders) == 50
    return {
        "GetOrder": got.SerializeToString(),
        "CreateOrder": created[-1].SerializeToString(),
        "ListOrders": page.SerializeToString(),
    }


def request_frames(directory: Path, order_id: int) -> dict[str, Path]:
    """The request h2load repeats, per method path, as gRPC frame files."""
    event = event_pb2.Event(
        type="bench.order_paid", source="/bench", subject="orders/1", json_payload='{"n": 1}'
    )
    messages = {
        ORDERS + "GetOrder": order_service_pb2.GetOrderRequest(id=order_id),
        ORDERS + "ListOrders": order_service_pb2.ListOrdersRequest(page_size=50),
        # Only for the ceiling: a repeated request_id is a replay on a real server.
        ORDERS + "CreateOrder": order_service_pb2.CreateOrderRequest(
            request_id="h2load",
            customer_id="c-1",
            currency="EUR",
            items=line_items(),
        ),
        EVENTS + "PublishEvents": event_service_pb2.PublishEventsRequest(events=[event]),
    }
    return {
        path: write_frame(message, directory / f"{path.rsplit('/', 1)[1]}.bin")
        for path, message in messages.items()
    }


async def probe(port: int, path: str, frame: Path) -> None:
    """h2load counts HTTP statuses only: one real call proves the body succeeds."""
    body = frame.read_bytes()[5:]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        await channel.unary_unary(path)(body, timeout=10)


@contextlib.asynccontextmanager
async def served_on(
    cpus: str, argv: list[str], env: dict[str, str]
) -> AsyncIterator[ServiceProcess]:
    """A server process (and any workers it forked) pinned to `cpus`."""
    async with served(argv, env) as server:
        pin(process_tree(server.pid), cpus)
        yield server


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of these processes so far, all threads included."""
    ticks = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


class Runner:
    """Runs one load point against a server and adds the server's CPU time
    per call (all its processes and threads, warm-up included in both the
    CPU time and the call count): less sensitive to other load on the
    machine than throughput, and it shows where the server's core goes."""

    def __init__(self, seconds: float, warmup: float, frames: dict[str, Path]) -> None:
        self.seconds = seconds
        self.warmup = warmup
        self.frames = frames

    def _with_server_cpu(self, server: ServiceProcess, load: Callable[[], dict]) -> dict:
        pids = process_tree(server.pid)
        before = cpu_seconds(pids)
        figures = load()
        calls = figures["rps"] * (self.seconds + self.warmup)
        used = cpu_seconds(pids) - before
        return {**figures, "server_cpu_us_per_call": used / calls * 1e6 if calls else 0.0}

    def h2load(
        self, server: ServiceProcess, path: str, concurrency: int, cpus: str = CLIENT_CPU
    ) -> dict:
        frame = self.frames[path]
        asyncio.run(probe(server.port, path, frame))
        return self._with_server_cpu(
            server,
            lambda: h2load.run(
                server.port,
                path,
                frame,
                concurrency=concurrency,
                seconds=self.seconds,
                warmup=self.warmup,
                cpus=cpus,
            ).as_dict(),
        )

    def python_creates(self, server: ServiceProcess, concurrency: int) -> dict:
        command = [
            "taskset", "-c", CLIENT_CPU, sys.executable, "-m", "bench.grpc_load",
            f"--port={server.port}", f"--concurrency={concurrency}",
            f"--seconds={self.seconds}", f"--warmup={self.warmup}",
        ]  # fmt: skip
        return self._with_server_cpu(
            server,
            lambda: json.loads(
                subprocess.run(command, capture_output=True, text=True, check=True).stdout
            ),
        )

    def unary_matrix(self, server: ServiceProcess) -> dict[str, list[dict]]:
        figures: dict[str, list[dict]] = {}
        for method in METHODS:
            figures[method] = [
                self.python_creates(server, c)
                if method == "CreateOrder"
                else self.h2load(server, ORDERS + method, c)
                for c in CONCURRENCY
            ]
        return figures


def pgbench(db: Cluster, seconds: float) -> list[dict]:
    """`pgbench -S -M prepared` over the same verified TLS, in the server's
    place (CPU 0) against PostgreSQL on CPU 1."""
    env = libpq_env(db)
    subprocess.run(["pgbench", "-i", "-q", "-s", "1", db.dsn()], env=env, check=True,
                   capture_output=True)  # fmt: skip
    results = []
    for c in CONCURRENCY:
        out = subprocess.run(
            ["taskset", "-c", SERVER_CPU, "pgbench", "-S", "-M", "prepared", "-n",
             f"-c{c}", "-j1", f"-T{max(1, round(seconds))}", db.dsn()],
            env=env, capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        tps = re.search(r"tps = ([\d.]+)", out)
        latency = re.search(r"latency average = ([\d.]+) ms", out)
        assert tps is not None and latency is not None, out
        results.append(
            {"concurrency": c, "rps": float(tps.group(1)), "mean_ms": float(latency.group(1))}
        )
    return results


async def upload(port: int, count: int) -> dict[str, float]:
    """One UploadEvents stream of `count` events (messages built before the
    clock starts); the client's CPU share shows whether it was the limit."""
    messages = upload_messages(count)
    async with grpc.aio.insecure_channel(
        f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 64 << 20)]
    ) as channel:
        events = event_service_pb2_grpc.EventServiceStub(channel)
        cpu, started = time.process_time(), time.perf_counter()
        response = await events.UploadEvents(iter(messages))
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    assert response.event_count == count
    return {"events": count, "events_s": count / wall, "client_cpu_share": cpu / wall}


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Every figure. The load runs in a thread (asyncio.to_thread) while a
    server runs, so the event loop keeps reading the server's log."""
    # This process (and its output-draining threads) stays off the server's CPU.
    os.sched_setaffinity(0, {int(CLIENT_CPU)})
    results: dict[str, Any] = {"unary": {}}
    with cluster() as db, tempfile.TemporaryDirectory() as scratch:
        pin(postgres_pids(db), CLIENT_CPU)
        env = orderstream_env(db)
        async with served(serve_argv(), env) as server:
            responses = await seed(server.port, 200)
            first_id = order_pb2.Order.FromString(responses["GetOrder"]).id
        canned = Path(scratch) / "responses.json"
        canned.write_text(json.dumps({k: v.hex() for k, v in responses.items()}))
        runner = Runner(args.seconds, args.warmup, request_frames(Path(scratch), first_id))
        results["response_bytes"] = {k: len(v) for k, v in responses.items()}

        print("measuring pgbench ...", flush=True)
        results["pgbench"] = pgbench(db, args.seconds)
        commands = {
            "ceiling": [sys.executable, "-m", "bench.ceiling_server", str(canned)],
            "orderstream": serve_argv(),
            "peer": [sys.executable, "-m", "bench.peer_server", f"--threads={POOL_SIZE}"],
        }
        for name, argv in commands.items():
            print(f"measuring {name} ...", flush=True)
            async with served_on(SERVER_CPU, argv, env) as server:
                results["unary"][name] = await asyncio.to_thread(runner.unary_matrix, server)
                if name == "ceiling":
                    # The Python client's own limit, next to h2load's, on the same server.
                    results["client_check"] = {
                        "python_create_vs_ceiling": await asyncio.to_thread(
                            runner.python_creates, server, HEADLINE
                        ),
                        "h2load_create_vs_ceiling": await asyncio.to_thread(
                            runner.h2load, server, ORDERS + "CreateOrder", HEADLINE
                        ),
                    }

        print("measuring the ceiling with one database round trip ...", flush=True)
        async with served_on(SERVER_CPU, commands["ceiling"] + ["--wait", "pool"], env) as server:
            results["round_trip"] = await asyncio.to_thread(
                runner.h2load, server, ORDERS + "GetOrder", HEADLINE
            )

        print("measuring bulk writes ...", flush=True)
        async with served_on(SERVER_CPU, serve_argv(), env) as server:
            results["bulk"] = {
                "publish_per_event": await asyncio.to_thread(
                    runner.h2load, server, EVENTS + "PublishEvents", HEADLINE
                ),
                "upload": await upload(server.port, args.upload_events),
            }

        print("measuring workers ...", flush=True)
        os.sched_setaffinity(0, {0, 1})
        pin(postgres_pids(db), ALL_CPUS)
        results["workers"] = {}
        for workers in (1, 2):
            for name, argv in (
                ("ceiling", commands["ceiling"] + [f"--workers={workers}"]),
                ("orderstream", serve_argv(workers)),
            ):
                async with served_on(ALL_CPUS, argv, env) as server:
                    results["workers"][f"{name}_{workers}"] = [
                        await asyncio.to_thread(
                            runner.h2load, server, ORDERS + "GetOrder", c, ALL_CPUS
                        )
                        for c in (HEADLINE, 64)
                    ]
    return results


def at(points: list[dict], concurrency: int) -> dict:
    return next(p for p in points if p["concurrency"] == concurrency)


def ratios(results: dict[str, Any]) -> dict[str, float]:
    unary = results["unary"]

    def point(server: str, method: str, concurrency: int) -> dict[str, Any]:
        return at(unary[server][method], concurrency)

    def vs(method: str, other: str, concurrency: int, figure: str = "rps") -> float:
        ours = point("orderstream", method, concurrency)[figure]
        return float(ours / point(other, method, concurrency)[figure])

    bulk, workers = results["bulk"], results["workers"]
    return {
        "get_vs_peer_16": vs("GetOrder", "peer", 16),
        "get_vs_peer_64": vs("GetOrder", "peer", 64),
        "get_vs_ceiling_16": vs("GetOrder", "ceiling", 16),
        "list_vs_peer_16": vs("ListOrders", "peer", 16),
        "list_vs_peer_64": vs("ListOrders", "peer", 64),
        "create_vs_peer_16": vs("CreateOrder", "peer", 16),
        "create_vs_peer_64": vs("CreateOrder", "peer", 64),
        "get_p99_vs_peer_16": vs("GetOrder", "peer", 16, "p99_ms"),
        "get_p50_vs_peer_1": vs("GetOrder", "peer", 1, "p50_ms"),
        "upload_vs_publish": bulk["upload"]["events_s"] / bulk["publish_per_event"]["rps"],
        # Not targets: what a second worker adds on this shared machine, and
        # how close GetOrder comes to grpc.aio plus one round trip.
        "workers2_vs_1": at(workers["orderstream_2"], HEADLINE)["rps"]
        / at(workers["orderstream_1"], HEADLINE)["rps"],
        "get_vs_round_trip": point("orderstream", "GetOrder", HEADLINE)["rps"]
        / results["round_trip"]["rps"],
    }


def verdict(key: str, value: float) -> tuple[str, bool]:
    """The target of ratio `key` as a bound (">= 1.2") and whether `value` meets it."""
    bound, sense = TARGETS[key]
    met = value >= bound if sense == ">=" else value <= bound
    return f"{sense} {bound:g}", met


def report(results: dict[str, Any], measured: dict[str, float]) -> None:
    print(f"\nunary benchmark: {results['placement']}; {results['seconds']:g} s per point\n")
    print(
        f"{'method':<13}{'server':<13}{'concurrency':>11}{'calls/s':>10}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'server CPU µs/call':>20}"
    )
    for method in METHODS:
        for server in SERVERS:
            for p in results["unary"][server][method]:
                print(
                    f"{method:<13}{server:<13}{p['concurrency']:>11}{p['rps']:>10,.0f}"
                    f"{p['p50_ms']:>9.2f}{p['p99_ms']:>9.2f}{p['server_cpu_us_per_call']:>20,.0f}"
                )
    for p in results["pgbench"]:
        label = "pgbench -S -M prepared"
        print(f"{label:<26}{p['concurrency']:>11}{p['rps']:>10,.0f}   mean {p['mean_ms']:.2f} ms")

    check = results["client_check"]
    print(
        f"\nPython CreateOrder client against the ceiling at {HEADLINE}: "
        f"{check['python_create_vs_ceiling']['rps']:,.0f} calls/s "
        f"(h2load: {check['h2load_create_vs_ceiling']['rps']:,.0f})"
    )
    bulk = results["bulk"]
    print(
        f"PublishEvents, one event per call, {HEADLINE} in flight: "
        f"{bulk['publish_per_event']['rps']:,.0f} events/s; UploadEvents: "
        f"{bulk['upload']['events_s']:,.0f} events/s "
        f"(client CPU {bulk['upload']['client_cpu_share']:.0%} of the wall time)"
    )
    print(
        f"\nGetOrder, servers, PostgreSQL and h2load on both CPUs ({results['workers_placement']}):"
    )
    for name, points in results["workers"].items():
        workers = int(name.rpartition("_")[2])
        line = ", ".join(
            f"{p['rps']:,.0f} calls/s at {p['concurrency']} "
            f"({p['server_cpu_us_per_call']:,.0f} µs of server CPU a call; servers busy "
            f"{p['rps'] * p['server_cpu_us_per_call'] / 1e6:.2f} CPUs, "
            f"{p['rps'] * p['server_cpu_us_per_call'] / 1e6 / workers:.2f} per worker)"
            for p in points
        )
        print(f"  {name:<16}{line}")

    trip, ceiling = results["round_trip"], at(results["unary"]["ceiling"]["GetOrder"], HEADLINE)
    print(
        f"\nThe ceiling's GetOrder plus one `SELECT 1` through the service's pool, at {HEADLINE}: "
        f"{trip['rps']:,.0f} calls/s, {trip['server_cpu_us_per_call']:,.0f} µs server CPU per "
        f"call (bare: {ceiling['server_cpu_us_per_call']:,.0f}); orderstream's GetOrder reaches "
        f"{measured['get_vs_round_trip']:.2f} of it"
    )

    print(f"\n{'ratio':<44}{'measured':>10}{'target':>10}")
    for key, label in LABELS.items():
        value = measured[key]
        bound, met = verdict(key, value)
        print(f"{label:<44}{value:>10.2f}{bound:>10}  {'met' if met else 'NOT MET'}")
    for key, label in UNTARGETED.items():
        print(f"{label:<44}{measured[key]:>10.2f}  (no target)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=4.0, help="measured time per point")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured time per point")
    parser.add_argument("--upload-events", type=int, default=UPLOAD_EVENTS)
    args = parser.parse_args()
    if args.seconds < 1:
        parser.error("--seconds must be at least 1 (h2load refuses shorter durations)")
    results = asyncio.run(measure(args))
    results.update(
        machine=machine(),
        seconds=args.seconds,
        placement="each server on CPU 0; PostgreSQL, h2load and Python clients on CPU 1",
        workers_placement="unpinned",
        concurrency=list(CONCURRENCY),
    )
    measured = ratios(results)
    results["ratios"] = measured
    results["targets"] = TARGETS
    report(results, measured)
    path = save("unary", results)
    chart = draw(results, RESULTS / "unary.png")
    print(f"\nraw results: {path}\nchart: {chart}")


if __name__ == "__main__":
    main()
