"""What every benchmark needs: a database cluster, a service process, CPU
placement, and a place for results."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

from devcluster.cluster import Cluster
from devcluster.process import INSECURE_DEV, ServiceProcess, service_argv
from devcluster.process import served as served_process
from devcluster.throwaway import throwaway_cluster

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


@contextlib.contextmanager
def cluster() -> Iterator[Cluster]:
    """A throwaway, durable cluster (fsync on, as in production)."""
    with throwaway_cluster("orderstream-bench-", durable=True) as running:
        yield running


def libpq_env(db: Cluster) -> dict[str, str]:
    """The environment for libpq's own tools (psql, pgbench): verified TLS."""
    return {**os.environ, "PGSSLMODE": "verify-full", "PGSSLROOTCERT": str(db.certificates.ca_cert)}


def postgres_pids(db: Cluster) -> list[int]:
    out = subprocess.run(["pgrep", "-f", str(db.data_dir)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def pin(pids: list[int], cpus: str) -> None:
    """Pins processes (and their threads) to CPUs, e.g. "0" or "0,1"."""
    for pid in pids:
        subprocess.run(["taskset", "-a", "-p", "-c", cpus, str(pid)], capture_output=True)


def service_env(db: Cluster, **overrides: str) -> dict[str, str]:
    """The service's environment as deployed, on a free port (ORDERSTREAM_PORT=0)."""
    return {
        **db.service_env(),
        **INSECURE_DEV,
        "ORDERSTREAM_HOST": "127.0.0.1",
        "ORDERSTREAM_PORT": "0",
        "ORDERSTREAM_LOG_LEVEL": "INFO",  # the "serving" line carries the port
        **overrides,
    }


def serve_argv(workers: int = 1) -> list[str]:
    return service_argv("serve", "--workers", str(workers))


@contextlib.asynccontextmanager
async def service(db: Cluster, **env: str) -> AsyncIterator[ServiceProcess]:
    """`python -m service serve`, as deployed."""
    async with served(serve_argv(), service_env(db, **env)) as server:
        yield server


@contextlib.asynccontextmanager
async def served(argv: list[str], env: dict[str, str]) -> AsyncIterator[ServiceProcess]:
    """Any server process that logs a JSON "serving" line with its port on
    stderr (the service, the ceiling, the peer); SIGTERM stops it. Its log
    is read while the event loop runs: blocking work goes to a thread
    meanwhile (asyncio.to_thread), or the server could block on a full pipe."""
    async with served_process(argv, env, stop_timeout=30, keep=_startup_lines()) as server:
        yield server


def _startup_lines() -> Callable[[str], bool]:
    """Which log lines to keep: those up to the "serving" line (a few, shown
    if the server never serves). After it every call logs a line, far too
    many to keep: warnings and errors are passed on as they come, the rest
    dropped."""
    serving = False

    def keep(line: str) -> bool:
        nonlocal serving
        if serving:
            if '"ERROR"' in line or '"WARNING"' in line:
                sys.stderr.write(f"service: {line}\n")
            return False
        serving = '"serving"' in line
        return True

    return keep


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (forked workers), for pinning."""
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [pid] + [p for child in out.stdout.split() for p in process_tree(int(child))]


def machine() -> dict[str, object]:
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }


def save(name: str, results: dict[str, object]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **results}, indent=2) + "\n")
    return path
