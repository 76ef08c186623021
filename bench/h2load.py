"""Runs h2load against one gRPC method and reads its figures.

h2load prints throughput but only mean latency, so percentiles come from its
per-request log (`--log-file`: start, status, microseconds per line). It counts
HTTP statuses, not gRPC ones, which travel in trailers: callers prove the body
succeeds with one real call first (see bench/unary.py).
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.grpc_wire import REQUEST_HEADERS


@dataclass
class LoadResult:
    concurrency: int
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    failed: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def connections_for(concurrency: int) -> tuple[int, int]:
    """(connections, streams per connection): up to 16 connections, as
    several client processes would open, then more streams on each."""
    connections = min(concurrency, 16)
    return connections, max(1, concurrency // connections)


def percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, round(fraction * (len(sorted_values) - 1)))
    return sorted_values[index]


def run(
    port: int,
    method: str,
    body: Path,
    *,
    concurrency: int,
    seconds: float,
    warmup: float,
    cpus: str,
) -> LoadResult:
    """Keeps `concurrency` calls of `method` in flight for `seconds`."""
    connections, streams = connections_for(concurrency)
    with tempfile.TemporaryDirectory() as scratch:
        log = Path(scratch) / "requests.log"
        command = [
            "taskset", "-c", cpus,
            "h2load",
            f"--duration={seconds:g}",
            f"--warm-up-time={round(warmup * 1000)}ms",
            f"--clients={connections}",
            f"--max-concurrent-streams={streams}",
            "--threads=1",
            f"--data={body}",
            f"--log-file={log}",
            *(arg for header in REQUEST_HEADERS for arg in ("-H", header)),
            f"http://127.0.0.1:{port}{method}",
        ]  # fmt: skip
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        latencies = sorted(int(line.split("\t")[2]) / 1000 for line in log.open() if line.strip())
    done = re.search(
        r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed", out
    )
    # The rate counts the measured duration only, not the warm-up.
    rate = re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", out)
    if done is None or rate is None:
        raise RuntimeError(f"cannot read h2load output:\n{out}")
    requests = int(done.group(1))
    return LoadResult(
        concurrency=concurrency,
        requests=requests,
        seconds=seconds,
        rps=float(rate.group(1)),
        p50_ms=percentile(latencies, 0.50),
        p99_ms=percentile(latencies, 0.99),
        failed=int(done.group(2)),
    )
