"""Prometheus metrics for one server: RPCs, latency, streams, rows and the pool.

Each App gets its own registry (tests run several servers in one process,
and a worker process owns exactly one), served over HTTP on its own port by
prometheus-client's exporter. Pool figures are read when scraped, not
tracked on every acquire.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Iterator
from threading import Thread
from wsgiref.simple_server import WSGIServer

import asyncpg
from prometheus_client import (
    GC_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from service.db.replica import ReplicaMonitor

log = logging.getLogger(__name__)

# Unary calls take milliseconds; streams and uploads can take minutes.
_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300,
)  # fmt: skip


class _PoolCollector(Collector):
    """Reads the asyncpg pool's figures at scrape time."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    def collect(self) -> Iterator[GaugeMetricFamily]:
        pool = self._pool
        size = pool.get_size()
        idle = pool.get_idle_size()
        # asyncpg has no public count of waiters; its queue of free holders
        # has one getter per task blocked in acquire().
        queue = getattr(pool, "_queue", None)
        waiting = len(getattr(queue, "_getters", ())) if queue is not None else 0
        for name, help_text, value in (
            ("orderstream_pool_size", "Connections open in the pool.", size),
            ("orderstream_pool_idle", "Open connections not in use.", idle),
            ("orderstream_pool_in_use", "Connections handed out to calls.", size - idle),
            ("orderstream_pool_waiting", "Calls waiting for a connection.", waiting),
            ("orderstream_pool_max_size", "Most connections allowed.", pool.get_max_size()),
        ):
            yield GaugeMetricFamily(name, help_text, value=value)


class _ReplicaCollector(Collector):
    """Reads the replica monitor's verdict at scrape time."""

    def __init__(self, monitor: ReplicaMonitor) -> None:
        self._monitor = monitor

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(
            "orderstream_replica_usable",
            "1 while reads may go to the read replica, 0 while they go to the primary.",
            value=int(self._monitor.usable),
        )
        if self._monitor.lag is not None:
            yield GaugeMetricFamily(
                "orderstream_replica_lag_seconds",
                "Age of the oldest primary WAL position the replica has not replayed.",
                value=self._monitor.lag,
            )


class _CycleCollectorSettings(Collector):
    """How the cycle collector is set (service/ops/garbage.py), read at
    scrape time; prometheus-client's own GC collector counts the
    collections by generation beside it."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(
            "orderstream_gc_frozen_objects",
            "Objects moved out of the cycle collector's reach at start-up.",
            value=gc.get_freeze_count(),
        )
        thresholds = GaugeMetricFamily(
            "orderstream_gc_threshold",
            "The cycle collector's threshold, by generation.",
            labels=("generation",),
        )
        for generation, threshold in enumerate(gc.get_threshold()):
            thresholds.add_metric((str(generation),), threshold)
        yield thresholds


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.rpcs = Counter(
            "orderstream_rpcs",
            "Finished RPCs by method and status code.",
            ("method", "code"),
            registry=self.registry,
        )
        self.latency = Histogram(
            "orderstream_rpc_duration_seconds",
            "RPC duration from the first byte to the status, by method.",
            ("method",),
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.active_streams = Gauge(
            "orderstream_active_streams",
            "Streaming RPCs (exports, streams, uploads, imports) in progress, by method.",
            ("method",),
            registry=self.registry,
        )
        self.rows_streamed = Counter(
            "orderstream_rows_streamed",
            "Rows sent to callers by server-streaming RPCs.",
            ("method",),
            registry=self.registry,
        )
        self.rows_copied = Counter(
            "orderstream_rows_copied",
            "Rows committed by client-streaming loads (COPY).",
            ("method",),
            registry=self.registry,
        )
        self.refused = Counter(
            "orderstream_refused_calls",
            "Calls refused by policy, by ErrorInfo reason: authentication (TOKEN_*), "
            "scope (SCOPE_MISSING, METHOD_NOT_ALLOWED), slot limits (TOO_MANY_STREAMS).",
            ("reason",),
            registry=self.registry,
        )
        self.reads = Counter(
            "orderstream_routed_reads",
            "Reads that may use the replica, by method and the database that served them.",
            ("method", "database"),
            registry=self.registry,
        )
        self.registry.register(GC_COLLECTOR)
        self.registry.register(_CycleCollectorSettings())

    def watch_pool(self, pool: asyncpg.Pool) -> None:
        self.registry.register(_PoolCollector(pool))

    def watch_replica(self, monitor: ReplicaMonitor) -> None:
        self.registry.register(_ReplicaCollector(monitor))

    def count_read(self, method: str, database: str) -> None:
        self.reads.labels(method, database).inc()

    def count_refusal(self, reason: str) -> None:
        self.refused.labels(reason).inc()


class MetricsEndpoint:
    """prometheus-client's HTTP exporter for one registry (a daemon thread)."""

    def __init__(self, server: WSGIServer, thread: Thread) -> None:
        self._server = server
        self._thread = thread

    @classmethod
    def start(cls, registry: CollectorRegistry, host: str, port: int) -> MetricsEndpoint:
        server, thread = start_http_server(port, addr=host.strip("[]"), registry=registry)
        return cls(server, thread)

    @property
    def port(self) -> int:
        return int(self._server.server_port)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
