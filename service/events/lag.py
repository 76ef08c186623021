"""Each durable consumer's lag, as Prometheus gauges.

A scrape runs in prometheus-client's thread and cannot query the database,
so a task reads every consumer's lag each ORDERSTREAM_CONSUMER_LAG_INTERVAL
(one statement, service/events/consumers.py's DESCRIBE) and the collector
serves the last reading. Every replica exports the same figures (take the
max or any one): the lag is the database's, not a process's.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import asyncpg
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from service.events import consumers, sql

log = logging.getLogger(__name__)


class ConsumerLag(Collector):
    def __init__(self) -> None:
        self._readings: list[tuple[str, int, float]] = []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        events = GaugeMetricFamily(
            "orderstream_consumer_lag_events",
            "Final events after a durable consumer's acknowledged position (counted up to "
            f"{consumers.MAX_LAG_COUNT}, the id distance beyond).",
            labels=("consumer",),
        )
        seconds = GaugeMetricFamily(
            "orderstream_consumer_lag_seconds",
            "Age, by its time, of the oldest event a durable consumer has not acknowledged.",
            labels=("consumer",),
        )
        for name, count, age in self._readings:
            events.add_metric((name,), count)
            seconds.add_metric((name,), age)
        yield events
        yield seconds

    async def refresh(self, pool: asyncpg.Pool, *, timeout: float = 30.0) -> None:
        # One pooled connection, taken like a call's; the horizon is its own
        # statement, before the snapshot that counts below it.
        async with pool.acquire(timeout=timeout) as conn:
            horizon = await conn.fetchval(sql.SAFE_HORIZON, timeout=timeout)
            rows = await conn.fetch(consumers.DESCRIBE, horizon, None, timeout=timeout)
        self._readings = [(r["name"], r["lag_events"], r["lag_seconds"]) for r in rows]

    async def refresh_forever(self, pool: asyncpg.Pool, *, interval: float) -> None:
        """A reading now and every `interval` seconds until cancelled; one
        that fails keeps the last reading and is logged."""
        while True:
            try:
                await self.refresh(pool)
            except Exception as exc:  # the next reading retries; the task must not die
                log.warning(
                    "consumer lag not read this round",
                    extra={"error": f"{type(exc).__name__}: {exc}"},
                )
            await asyncio.sleep(interval)
