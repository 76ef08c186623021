"""What every benchmark needs: a database cluster, a service process, CPU
placement, and a place for results."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from devcluster.cluster import Cluster, start_cluster, stop_cluster

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


@contextlib.contextmanager
def cluster() -> Iterator[Cluster]:
    """A throwaway, durable cluster (fsync on, as in production)."""
    base = Path(tempfile.mkdtemp(prefix="orderstream-bench-"))
    running = start_cluster(base, durable=True)
    try:
        yield running
    finally:
        stop_cluster(running, mode="fast")
        shutil.rmtree(base, ignore_errors=True)


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


@dataclass
class ServiceProcess:
    process: subprocess.Popen[str]
    port: int

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss_kib(self) -> int:
        return _status_kib(self.pid, "VmRSS")

    def peak_rss_kib(self) -> int:
        return _status_kib(self.pid, "VmHWM")


def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def service_env(db: Cluster, **overrides: str) -> dict[str, str]:
    """The service's environment as deployed, on a free port (ORDERSTREAM_PORT=0)."""
    return {
        **db.service_env(),
        "ORDERSTREAM_HOST": "127.0.0.1",
        "ORDERSTREAM_PORT": "0",
        "ORDERSTREAM_LOG_LEVEL": "INFO",  # the "serving" line carries the port
        **overrides,
    }


def service_argv(workers: int = 1) -> list[str]:
    return [sys.executable, "-m", "service", "serve", "--workers", str(workers)]


@contextlib.contextmanager
def service(db: Cluster, **env: str) -> Iterator[ServiceProcess]:
    """`python -m service serve`, as deployed."""
    with served(service_argv(), service_env(db, **env)) as process:
        yield process


@contextlib.contextmanager
def served(argv: list[str], env: dict[str, str]) -> Iterator[ServiceProcess]:
    """Any server process that logs a JSON "serving" line with its port on
    stderr (the service, the ceiling, the peer); SIGTERM stops it."""
    process = subprocess.Popen(
        argv, cwd=REPO, env={**os.environ, **env}, stderr=subprocess.PIPE, text=True
    )
    try:
        yield ServiceProcess(process, _serving_port(process))
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (forked workers), for pinning."""
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [pid] + [p for child in out.stdout.split() for p in process_tree(int(child))]


def _serving_port(process: subprocess.Popen[str]) -> int:
    assert process.stderr is not None
    for line in process.stderr:
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if entry.get("message") == "serving":
                # Keep draining stderr so the service never blocks on it.
                _drain_in_background(process)
                return int(entry["port"])
    raise RuntimeError(f"service exited with {process.wait()} before serving")


def _drain_in_background(process: subprocess.Popen[str]) -> None:
    def drain() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            if '"ERROR"' in line or '"WARNING"' in line:
                sys.stderr.write("service: " + line)

    threading.Thread(target=drain, daemon=True).start()


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
