"""What one database round trip costs a grpc.aio call (issue 17, route 1).

    python -m bench.round_trip [--seconds 5]

On a throwaway durable cluster, PostgreSQL and the load on CPU 1, the
measured process on CPU 0:

1. asyncpg alone: 1 and 16 tasks on uvloop, each running `SELECT 1` in a
   loop on its own connection of a pool opened as the service's (verified
   TLS): queries/s and CPU per query.
2. the ceiling (bench/ceiling_server.py: a bare grpc.aio server on uvloop)
   whose GetOrder answers a fixed message after each of its `--wait`s in
   turn (none, one turn of the loop, a 200 µs timer, `SELECT 1` through
   the pool, on a connection of its own, or shared by the calls that
   arrive while one is in flight, with its mean batch), with h2load
   keeping 16 calls in flight. For each: calls/s and CPU per call of the
   loop thread and of gRPC's own threads (`/proc/<pid>/task`), with
   voluntary and involuntary context switches per call.

What it shows is where the loop's time goes when a call waits on a socket
(docs/benchmarks.md#what-stands-in-the-way). Nothing here is a target.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg
import uvloop

from bench import h2load
from bench.ceiling_server import DEDICATED_CONNECTIONS, WAITS
from bench.harness import cluster, pin, postgres_pids, save, served
from bench.unary import CLIENT_CPU, ORDERS, SERVER_CPU, request_frames
from devcluster.cluster import Cluster
from orderstream.orders.v1 import order_pb2, order_service_pb2
from service.db.pool import open_pool
from service.ops import memory
from service.settings import Settings

CONCURRENCY = DEDICATED_CONNECTIONS  # a connection of its own for each call in flight


def canned_responses(directory: Path) -> Path:
    """The ceiling's answers: small fixed messages (RESPONSES.json)."""
    order = order_pb2.Order(id=1, customer_id="c-1", currency="EUR").SerializeToString().hex()
    page = order_service_pb2.ListOrdersResponse().SerializeToString().hex()
    canned = directory / "responses.json"
    canned.write_text(json.dumps({"GetOrder": order, "CreateOrder": order, "ListOrders": page}))
    return canned


async def queries(tasks: int, seconds: float) -> None:
    """asyncpg alone: prints one JSON line of queries/s and CPU per query."""
    pool = await open_pool(Settings.from_env(os.environ))
    conns = [await pool.acquire() for _ in range(tasks)]
    done = 0
    stop = time.monotonic() + seconds

    async def loop(conn: asyncpg.Connection) -> None:
        nonlocal done
        while time.monotonic() < stop:
            await conn.fetchval("SELECT 1")
            done += 1

    cpu = time.process_time()
    await asyncio.gather(*(loop(c) for c in conns))
    used = time.process_time() - cpu
    print(json.dumps({"per_s": done / seconds, "cpu_us": used / done * 1e6}))


def probe_env(db: Cluster) -> dict[str, str]:
    """The service's settings for the cluster, with a pool that holds a
    connection for every call in flight and one for the coalescer."""
    size = str(CONCURRENCY + 1)
    return {
        **db.service_env(),
        "ORDERSTREAM_POOL_MIN_SIZE": size,
        "ORDERSTREAM_POOL_MAX_SIZE": size,
    }


def threads(pid: int) -> dict[str, list[float]]:
    """CPU seconds and context switches so far, per thread kind: the main
    thread (the event loop) and the others by name."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0, 0.0])
    for tid in os.listdir(f"/proc/{pid}/task"):
        stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        name = "loop" if int(tid) == pid else stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat.rsplit(")", 1)[1].split()
        status = Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines()
        switches = [int(line.split()[1]) for line in status if "ctxt_switches" in line]
        kind = out[name]
        kind[0] += (int(fields[11]) + int(fields[12])) / tick
        kind[1] += switches[0]
        kind[2] += switches[1]
    return out


async def measure_server(
    db: Cluster, wait: str, canned: Path, frame: Path, seconds: float
) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile() as batch:
        argv = [
            sys.executable, "-m", "bench.ceiling_server", str(canned),
            "--wait", wait, "--batch-file", batch.name,
        ]  # fmt: skip
        async with served(argv, probe_env(db)) as server:
            pin([server.pid], SERVER_CPU)
            before = threads(server.pid)
            load = await asyncio.to_thread(
                h2load.run,
                server.port,
                ORDERS + "GetOrder",
                frame,
                concurrency=CONCURRENCY,
                seconds=seconds,
                warmup=0,
                cpus=CLIENT_CPU,
            )
            after = threads(server.pid)
        calls = load.requests
        per_thread = {
            name: {
                "cpu_us": (now[0] - before.get(name, [0.0] * 3)[0]) / calls * 1e6,
                "voluntary": (now[1] - before.get(name, [0.0] * 3)[1]) / calls,
                "involuntary": (now[2] - before.get(name, [0.0] * 3)[2]) / calls,
            }
            for name, now in after.items()
        }
        figures: dict[str, Any] = {"per_s": load.rps, "threads": per_thread}
        if wait == "coalesced":
            figures["batch"] = float(Path(batch.name).read_text() or 0)
    return figures


def run_queries(db: Cluster, tasks: int, seconds: float) -> dict[str, float]:
    command = [
        "taskset", "-c", SERVER_CPU, sys.executable, "-m", "bench.round_trip",
        "--queries", str(tasks), "--seconds", str(seconds),
    ]  # fmt: skip
    env = {**os.environ, **probe_env(db)}
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    return dict(json.loads(out))


async def measure(seconds: float) -> dict[str, Any]:
    os.sched_setaffinity(0, {int(CLIENT_CPU)})
    with cluster() as db, tempfile.TemporaryDirectory() as scratch:
        pin(postgres_pids(db), CLIENT_CPU)
        frame = request_frames(Path(scratch), 1)[ORDERS + "GetOrder"]
        canned = canned_responses(Path(scratch))
        alone = {tasks: run_queries(db, tasks, seconds) for tasks in (1, CONCURRENCY)}
        for tasks, q in alone.items():
            print(f"asyncpg alone, {tasks} tasks: {q['per_s']:,.0f} queries/s, "
                  f"{q['cpu_us']:.0f} µs CPU per query", flush=True)  # fmt: skip
        servers = {}
        for wait in WAITS:
            servers[wait] = r = await measure_server(db, wait, canned, frame, seconds)
            batch = f", mean batch {r['batch']:.2f}" if "batch" in r else ""
            print(f"\nGetOrder after wait={wait}: {r['per_s']:,.0f} calls/s{batch}", flush=True)
            print("| thread | CPU µs per call | voluntary / involuntary switches per call |")
            print("|---|---:|---:|")
            for name, t in sorted(r["threads"].items(), key=lambda kv: -kv[1]["cpu_us"]):
                if t["cpu_us"] >= 1 or t["voluntary"] >= 0.05:
                    print(f"| {name} | {t['cpu_us']:.0f} | "
                          f"{t['voluntary']:.2f} / {t['involuntary']:.2f} |")  # fmt: skip
    return {"asyncpg_alone": alone, "servers": servers}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="measured time per point")
    parser.add_argument("--queries", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.queries:
        memory.keep_reads_off_mmap()  # as the service's processes do
        uvloop.run(queries(args.queries, args.seconds))
    else:
        results = asyncio.run(measure(args.seconds))
        print(f"\nwrote {save('round_trip', results)}")


if __name__ == "__main__":
    main()
