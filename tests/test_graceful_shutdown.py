"""SIGTERM on a real `python -m service` process while an upload
(UploadEvents) and a history stream (StreamEvents) are in flight: health
flips to NOT_SERVING at once, on the main port and the probe port; new calls
are refused; both calls finish within the grace; every acknowledged row is
in the database; the pool is closed; the process exits 0."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devcluster.process import service_process
from orderstream.events.v1 import event_pb2, event_service_pb2, event_service_pb2_grpc
from tests.support.polling import eventually
from tests.support.processes import new_call_is_refused, pool_closed, serve_env
from tests.support.requests import unique

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
PROMPTLY = 2.0  # seconds
GRACE = 15
# Far more than HTTP/2 flow control lets through unread, so the stream's
# writes block and it is still running when SIGTERM arrives.
HISTORY_EVENTS = 20_000
UPLOAD_BATCH = 1_000


def new_event(source: str, subject: str, n: int) -> event_pb2.Event:
    return event_pb2.Event(
        type="test.drain", source=source, subject=subject, json_payload=f'{{"n": {n}}}'
    )


def batch(source: str, subject: str, start: int, upload_id: str = "") -> object:
    return event_service_pb2.UploadEventsRequest(
        upload_id=upload_id,
        events=[new_event(source, subject, n) for n in range(start, start + UPLOAD_BATCH)],
    )


async def from_queue(queue: asyncio.Queue) -> AsyncIterator[object]:
    while (request := await queue.get()) is not None:
        yield request


async def in_transaction(admin, role: str) -> bool:
    return bool(
        await admin.fetchval(
            """
            SELECT count(*) FROM pg_stat_activity
            WHERE usename = $1 AND state = 'idle in transaction'
            """,
            role,
        )
    )


async def copy_running(admin, role: str) -> bool:
    return bool(
        await admin.fetchval(
            """
            SELECT count(*) FROM pg_stat_activity
            WHERE usename = $1 AND state = 'active' AND query LIKE 'COPY%'
            """,
            role,
        )
    )


async def probe_status(port: int) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        response = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
    return response.status


async def test_sigterm_lets_an_upload_and_a_stream_finish(service_env, login, admin):
    env = serve_env(service_env, login, grace=GRACE, event_loop=None)
    env.update(ORDERSTREAM_STREAM_BATCH_BYTES="1024", ORDERSTREAM_HEALTH_PORT="0")
    history_subject, source = unique("drain-history"), unique("/drain")
    async with service_process(env, "serve") as child:
        serving = await child.record("serving")
        port, probe_port = serving["port"], serving["health_port"]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            events = event_service_pb2_grpc.EventServiceStub(channel)
            history = asyncio.Queue()
            history_id = unique("drain-history-upload")
            for start in range(0, HISTORY_EVENTS, UPLOAD_BATCH):
                first = history_id if start == 0 else ""
                history.put_nowait(batch("/drain-history", history_subject, start, first))
            history.put_nowait(None)
            loaded = await events.UploadEvents(from_queue(history), timeout=30)
            assert loaded.event_count == HISTORY_EVENTS

            # In flight 1: a history stream, read one message, then left unread.
            stream = events.StreamEvents(
                event_service_pb2.StreamEventsRequest(subject=history_subject)
            )
            streamed = list((await stream.read()).events)
            # In flight 2: an upload with two of its batches sent.
            upload = asyncio.Queue()
            upload.put_nowait(batch(source, "uploaded", 0, upload_id=unique("drain-upload")))
            upload.put_nowait(batch(source, "uploaded", UPLOAD_BATCH))
            uploading = asyncio.ensure_future(events.UploadEvents(from_queue(upload)))
            await eventually(
                lambda: copy_running(admin, login.role), what="the upload's COPY to run"
            )
            # The stream is in flight, waiting on its reader's flow control;
            # it reads its history page by page, so it holds no transaction
            # meanwhile.
            assert not stream.done()
            assert not await in_transaction(admin, login.role)

            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
            assert (await watch.read()).status == SERVING
            child.process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            assert (await asyncio.wait_for(watch.read(), PROMPTLY)).status == NOT_SERVING
            assert await probe_status(probe_port) == NOT_SERVING
            await new_call_is_refused(port, 1)
            assert not uploading.done() and child.process.returncode is None

            # Both calls carry on to the end.
            upload.put_nowait(batch(source, "uploaded", 2 * UPLOAD_BATCH))
            upload.put_nowait(None)
            while (message := await stream.read()) is not grpc.aio.EOF:
                streamed.extend(message.events)
            uploaded = await uploading
            assert await stream.code() == grpc.StatusCode.OK
        assert await child.exit_code(timeout=GRACE) == 0, child.output
        exited_after = time.monotonic() - signalled
    assert exited_after < GRACE
    assert (await child.record("stopped"))["level"] == "INFO"

    assert len(streamed) == HISTORY_EVENTS
    ids = [event.id for event in streamed]
    assert ids == sorted(ids) and len(set(ids)) == HISTORY_EVENTS
    # The acknowledged upload is all there, and nothing else of it.
    assert uploaded.event_count == 3 * UPLOAD_BATCH
    stored = await admin.fetchrow(
        "SELECT count(*) AS n, min(id) AS first, max(id) AS last FROM events WHERE source = $1",
        source,
    )
    assert (stored["n"], stored["first"], stored["last"]) == (
        3 * UPLOAD_BATCH,
        uploaded.first_event_id,
        uploaded.last_event_id,
    )
    await eventually(lambda: pool_closed(admin, login.role), what="the process's pool to close")
