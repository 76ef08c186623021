"""The service under test, as a real `python -m service` process.

A real process everywhere it matters that it is one (shutdown bounded
during a blackhole, resident memory after a thousand cancels and during
the soak), and for the other scenarios too: one long-lived process that
survives every scenario in turn is itself part of the proof that the
service recovers with no restart. The pool-exhaustion scenario needs other
pool settings and runs a second, in-process instance (`running_app`) that
exposes the same metrics endpoint; both are read through `Target`.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import signal
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from prometheus_client.parser import text_string_to_metric_families

from devcluster.cluster import Cluster
from devcluster.process import (
    INSECURE_DEV,
    ServiceProcess,
    proc_status_kib,
    served,
    service_argv,
)

# Client channels: no BDP probing, so the flow-control window stays at its
# 64 KiB start and a paused reader really holds a stream's server back.
CHANNEL_OPTIONS = [("grpc.http2.bdp_probe", 0)]


def service_env(cluster: Cluster, **overrides: str) -> dict[str, str]:
    """Settings of a service whose pool reaches `cluster` (through the proxy)."""
    return {
        **cluster.service_env(),
        **INSECURE_DEV,
        "ORDERSTREAM_HOST": "127.0.0.1",
        "ORDERSTREAM_PORT": "0",
        "ORDERSTREAM_METRICS_PORT": "0",
        "ORDERSTREAM_PAGE_TOKEN_KEY": secrets.token_urlsafe(32),
        "ORDERSTREAM_HEALTH_CHECK_INTERVAL": "0.5",
        "ORDERSTREAM_POOL_MIN_SIZE": "2",
        "ORDERSTREAM_POOL_MAX_SIZE": "8",
        # Room for the cancel scenario's batches, whose slots free up only
        # once the server has seen each cancel.
        "ORDERSTREAM_MAX_STREAMS": "32",
        "ORDERSTREAM_POOL_ACQUIRE_TIMEOUT": "2",
        "ORDERSTREAM_COMMAND_TIMEOUT": "10",
        "ORDERSTREAM_SHUTDOWN_GRACE": "3",
        # Small stream messages: a history of a few MB is many messages, so
        # a paused reader leaves most of a cursor unread.
        "ORDERSTREAM_STREAM_BATCH_BYTES": "16384",
        **overrides,
    }


@dataclass
class Target:
    """Where a service under test answers: gRPC, metrics, and its pid if
    it is a process of its own."""

    port: int
    metrics_port: int
    pid: int | None = None

    async def metrics(self) -> dict[str, float]:
        """Every sample of the metrics endpoint, by name and labels."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"

        def scrape() -> str:
            with urllib.request.urlopen(url, timeout=10) as response:
                return str(response.read().decode())

        samples: dict[str, float] = {}
        for family in text_string_to_metric_families(await asyncio.to_thread(scrape)):
            for sample in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return samples

    def rss_bytes(self) -> int:
        assert self.pid is not None, "an in-process service has no RSS of its own"
        return proc_status_kib(self.pid, "VmRSS") * 1024


@dataclass
class RunningProcess:
    target: Target
    child: ServiceProcess

    def terminate(self) -> None:
        self.child.process.send_signal(signal.SIGTERM)


@contextlib.asynccontextmanager
async def running_process(env: dict[str, str]) -> AsyncIterator[RunningProcess]:
    """`python -m service serve`, stopped with SIGTERM on exit unless the
    scenario already stopped it."""
    async with served(service_argv("serve"), env) as child:
        assert child.serving is not None
        target = Target(child.port, child.serving["metrics_port"], child.pid)
        yield RunningProcess(target, child)


@contextlib.asynccontextmanager
async def channel_to(target: Target) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(
        f"127.0.0.1:{target.port}", options=CHANNEL_OPTIONS
    ) as channel:
        yield channel
