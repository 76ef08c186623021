"""A closed-loop gRPC load generator in Python, for what h2load cannot send:
CreateOrder needs a fresh request_id per call (h2load repeats one body, and a
repeated request_id is an idempotent replay, not a write).

    python -m bench.grpc_load --port P --concurrency 16 --seconds 4 --warmup 1

Sends pre-serialised bytes (no protobuf work per call beyond splicing in the
id) over several channels, and prints one JSON line: the LoadResult figures
and the client's own CPU seconds, so the run shows whether the client was
the limit. bench/unary.py starts it pinned to the client's CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import time
from collections.abc import Iterator

import grpc
import uvloop

from bench.h2load import LoadResult, connections_for, percentile
from orderstream.orders.v1 import order_pb2, order_service_pb2

CREATE_ORDER = "/orderstream.orders.v1.OrderService/CreateOrder"


def line_items() -> list[order_pb2.LineItem]:
    """The 3 items of every CreateOrder the benchmarks send."""
    return [
        order_pb2.LineItem(sku=f"SKU-{n}", quantity=n + 1, unit_price_cents=1250) for n in range(3)
    ]


def create_order_bodies(run_id: str) -> Iterator[bytes]:
    """Endless CreateOrder bodies (3 items), each with its own request_id.

    Protobuf fields concatenate: field 1 (request_id) spliced before the
    serialised rest is a valid message.
    """
    rest = order_service_pb2.CreateOrderRequest(
        customer_id="c-bench",
        currency="EUR",
        items=line_items(),
    ).SerializeToString()
    for n in itertools.count():
        request_id = f"{run_id}-{n}".encode()
        yield b"\x0a" + bytes([len(request_id)]) + request_id + rest


async def closed_loop(
    port: int, concurrency: int, seconds: float, warmup: float, run_id: str
) -> tuple[LoadResult, float]:
    connections, _ = connections_for(concurrency)
    channels = [
        # A distinct channel argument gives each channel its own connection.
        grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("bench.channel", n)])
        for n in range(connections)
    ]
    calls = [c.unary_unary(CREATE_ORDER) for c in channels]  # bytes in, bytes out
    bodies = create_order_bodies(run_id)
    latencies: list[float] = []
    failed = 0
    start = time.perf_counter()
    measure_from, stop_at = start + warmup, start + warmup + seconds

    async def caller(call: grpc.aio.UnaryUnaryMultiCallable) -> None:
        nonlocal failed
        while (now := time.perf_counter()) < stop_at:
            try:
                await call(next(bodies), timeout=10)
            except grpc.aio.AioRpcError:
                failed += 1
                continue
            if now >= measure_from:
                latencies.append(time.perf_counter() - now)

    cpu = time.process_time()
    await asyncio.gather(*(caller(calls[n % connections]) for n in range(concurrency)))
    cpu = time.process_time() - cpu
    for c in channels:
        await c.close()
    latencies.sort()
    result = LoadResult(
        concurrency=concurrency,
        requests=len(latencies),
        seconds=seconds,
        rps=len(latencies) / seconds,
        p50_ms=percentile(latencies, 0.50) * 1000,
        p99_ms=percentile(latencies, 0.99) * 1000,
        failed=failed,
    )
    return result, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--warmup", type=float, default=1.0)
    args = parser.parse_args()
    run_id = f"bench-{os.getpid()}-{time.time_ns()}"
    result, cpu = uvloop.run(
        closed_loop(args.port, args.concurrency, args.seconds, args.warmup, run_id)
    )
    print(json.dumps({**result.as_dict(), "client_cpu_s": cpu}))


if __name__ == "__main__":
    main()
