"""Scenario 9: a soak. Mixed load (creates, gets, streams, publishes,
uploads, imports, some invalid writes) while faults are injected at random: resets,
blackholes, terminated and killed backends, fast and immediate restarts.
Seeded (the seed is printed; SOAK_SEED replays it), bounded in faults and
time; ends with the ledger check (the `scenario` fixture) and flat RSS,
measured from the end of a first few seconds of the same load without faults.

CI runs it for SOAK_SECONDS=20 by default; `make soak` for 300.
"""

from __future__ import annotations

import asyncio
import os
import random

import grpc
import pytest

from orderstream.events.v1 import event_service_pb2
from orderstream.orders.v1 import order_service_pb2
from tests.faults.calls import PausedStream, ended_honestly
from tests.faults.history import SHORT_SUBJECT
from tests.faults.ledger import import_messages, order_request, publish_request, upload_messages
from tests.support.requests import unique

SECONDS = float(os.environ.get("SOAK_SECONDS", "20"))
MAX_FAULTS = max(3, int(SECONDS / 3))
WORKERS = 4
# The first seconds run the load without faults, before RSS is measured.
WARM_UP_SECONDS = min(5.0, SECONDS / 4)
# Growth allowed over the soak after its warm-up: see test_cancels.py.
RSS_GROWTH_BOUND = 32 * 1024 * 1024
# What a call may end with while faults come and go; never INTERNAL.
DURING_FAULTS = {
    grpc.StatusCode.OK,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
}
INVALID_WRITE_ENDS = (DURING_FAULTS - {grpc.StatusCode.OK}) | {grpc.StatusCode.INVALID_ARGUMENT}


async def _worker(rng, stop, orders, events, ledger, short_ids, seen) -> None:
    while not stop.is_set():
        action = rng.choice(("create", "get", "stream", "publish", "upload", "import", "invalid"))
        if action == "create":
            code = await ledger.create_order(orders, order_request(unique("soak")), timeout=5)
        elif action == "invalid":
            bad = order_request(unique("soak-bad"), currency="euro")
            code = await ledger.create_order(orders, bad, timeout=5)
            # Never OK: an invalid order acknowledged would also pass the
            # ledger (it would be found exactly once).
            assert code in INVALID_WRITE_ENDS, f"an invalid create ended {code.name}"
        elif action == "publish":
            request = publish_request(unique("soak-pub"), rng.randint(1, 20))
            code = await ledger.publish(events, request, timeout=5)
        elif action == "upload":
            requests = upload_messages(unique("soak-up"), rng.randint(1, 200), per_message=50)
            code = await ledger.upload(events, requests, timeout=10)
        elif action == "import":
            requests = import_messages(unique("soak-imp"), rng.randint(1, 50), per_message=20)
            code = await ledger.import_orders(orders, requests, timeout=10)
        elif action == "get":
            try:
                await orders.GetOrder(order_service_pb2.GetOrderRequest(id=1), timeout=5)
                code = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as error:
                code = error.code()
        else:
            stream = PausedStream(
                events.StreamEvents(
                    event_service_pb2.StreamEventsRequest(subject=SHORT_SUBJECT), timeout=10
                ),
                "events",
            )
            code = await stream.finish(timeout=30)
            ended_honestly(code, stream.ids, short_ids)
        seen[code] = seen.get(code, 0) + 1
        if action != "invalid":
            assert code in DURING_FAULTS, f"{action} ended {code.name}"


async def _inject(rng, stop, proxy, fault_cluster, admin, log) -> None:
    faults = 0
    while not stop.is_set() and faults < MAX_FAULTS:
        try:
            async with asyncio.timeout(rng.uniform(1.0, 3.0)):
                await stop.wait()
        except TimeoutError:
            pass
        if stop.is_set():
            return
        fault = rng.choice(
            ("reset", "blackhole", "terminate", "kill", "restart-fast", "restart-immediate")
        )
        log.append(fault)
        faults += 1
        if fault == "reset":
            proxy.cut()
        elif fault == "blackhole":
            proxy.blackhole()
            try:
                async with asyncio.timeout(rng.uniform(0.5, 2.0)):
                    await stop.wait()
            except TimeoutError:
                pass
            proxy.resume()
        elif fault in ("terminate", "kill"):
            backends = [row["pid"] for row in await admin.service_backends()]
            if backends:
                pid = rng.choice(backends)
                if fault == "terminate":
                    await admin.terminate(pid)
                else:
                    fault_cluster.kill_backend(pid)
        else:
            await fault_cluster.restart(fault.removeprefix("restart-"))


async def _run(tasks: list[asyncio.Future[None]], seconds: float) -> None:
    """Lets `tasks` run for `seconds`; a failed assertion in any of them
    fails the soak at once."""
    done, _ = await asyncio.wait(tasks, timeout=seconds, return_when=asyncio.FIRST_EXCEPTION)
    for task in done:
        task.result()


@pytest.mark.soak
async def test_soak(scenario, service, proxy, fault_cluster, admin, orders, events, history):
    seed = int(os.environ.get("SOAK_SEED", random.randrange(1 << 32)))
    print(f"soak seed {seed} (replay: SOAK_SEED={seed}), {SECONDS:g}s, up to {MAX_FAULTS} faults")
    rng = random.Random(seed)
    short_ids = await admin.fetch(
        "SELECT id FROM events WHERE subject = $1 ORDER BY id", SHORT_SUBJECT
    )
    ids = [row["id"] for row in short_ids]
    stop = asyncio.Event()
    seen: dict[grpc.StatusCode, int] = {}
    injected: list[str] = []
    workers = [
        asyncio.ensure_future(
            _worker(random.Random(rng.random()), stop, orders, events, scenario.ledger, ids, seen)
        )
        for _ in range(WORKERS)
    ]
    injector_rng = random.Random(rng.random())
    tasks = list(workers)
    try:
        # The same load without faults first: what the process allocates
        # once (pool, prepared statements, buffers) is not growth.
        await _run(tasks, WARM_UP_SECONDS)
        before = service.target.rss_bytes()
        tasks.append(
            asyncio.ensure_future(
                _inject(injector_rng, stop, proxy, fault_cluster, admin, injected)
            )
        )
        await _run(tasks, SECONDS - WARM_UP_SECONDS)
    finally:
        stop.set()
        async with asyncio.timeout(120):
            results = await asyncio.gather(*tasks, return_exceptions=True)
        proxy.resume()
    for result in results:
        if isinstance(result, BaseException):
            raise result
    growth = service.target.rss_bytes() - before
    print(
        f"soak: faults {injected}, "
        f"calls { ({code.name: n for code, n in seen.items()}) }, "
        f"RSS growth after the warm-up {growth / 2**20:.1f} MiB"
    )
    assert seen.get(grpc.StatusCode.OK, 0) > 0
    assert growth < RSS_GROWTH_BOUND, f"RSS grew {growth / 2**20:.1f} MiB during the soak"
