"""Scenario 5: callers cancel right after starting and after a few
messages, on the server stream and on the upload, a thousand times against
the real process, and its resident memory stays flat.

The bound: 16 MiB of growth after a warm-up of 200 cancels. A handler that
swallowed CancelledError leaks its call's native state (grpc #43360), and
an upload or stream that kept its batch alive keeps kilobytes to megabytes
per call; either shows up as tens of MiB over a thousand calls, while
allocator noise after the warm-up stays in single MiB.
"""

from __future__ import annotations

import asyncio

import grpc

from orderstream.events.v1 import event_service_pb2
from tests.faults.calls import FedStream
from tests.faults.history import SHORT_SUBJECT
from tests.faults.ledger import upload_messages
from tests.faults.service import RunningProcess
from tests.support.requests import unique

CANCELS = 1_000
WARM_UP = 200
BATCH = 6  # concurrent cancels, on one channel (fewer than the pool's 8 connections)
RSS_GROWTH_BOUND = 16 * 1024 * 1024
AFTER_MESSAGES = 3


async def _cancel_stream(events, after: int) -> None:
    call = events.StreamEvents(event_service_pb2.StreamEventsRequest(subject=SHORT_SUBJECT))
    for _ in range(after):
        await call.read()
    call.cancel()
    assert await call.code() == grpc.StatusCode.CANCELLED


async def _cancel_upload(events, ledger, after: int) -> None:
    key = unique("cancelled")
    requests = upload_messages(key, events=(after + 1) * 5, per_message=5)
    upload = FedStream(events.UploadEvents)
    upload.send(*requests[:after])
    await upload.written()
    upload.call.cancel()
    assert await upload.call.code() == grpc.StatusCode.CANCELLED
    ledger.record_not_committed("upload", key, requests)


async def _one(n: int, events, ledger) -> None:
    kind = n % 4
    if kind == 0:
        await _cancel_stream(events, 0)
    elif kind == 1:
        await _cancel_stream(events, AFTER_MESSAGES)
    elif kind == 2:
        await _cancel_upload(events, ledger, 0)
    else:
        await _cancel_upload(events, ledger, AFTER_MESSAGES)


async def _cancel_many(count: int, start: int, events, ledger) -> None:
    for first in range(start, start + count, BATCH):
        async with asyncio.timeout(60):
            await asyncio.gather(*(_one(n, events, ledger) for n in range(first, first + BATCH)))


async def test_a_thousand_cancels_leak_nothing(scenario, service: RunningProcess, events, history):
    await _cancel_many(WARM_UP, 0, events, scenario.ledger)
    before = service.target.rss_bytes()
    await _cancel_many(CANCELS, WARM_UP, events, scenario.ledger)
    growth = service.target.rss_bytes() - before
    assert growth < RSS_GROWTH_BOUND, f"RSS grew {growth / 2**20:.1f} MiB"
