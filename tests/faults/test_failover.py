"""Scenario 6: the primary dies and its synchronous standby is promoted.

A primary and a hot standby it replicates to synchronously
(synchronous_standby_names names it, synchronous_commit = on: a commit is
acknowledged, and visible, only once the standby has it), a real service
process writing orders, published events and uploads through both, a
follower reading the feed. The whole primary is SIGKILLed (postmaster and
backends, as a lost machine), health goes NOT_SERVING, the standby is
promoted with `pg_ctl promote` (what operators' tools run underneath; see
docs/operations.md#failover), and the service follows with no restart:
health SERVING, writes acknowledged on the new primary, the feed's LISTEN
connection back, and the follow stream, open throughout, gone on with no
gap and no duplicate. The ledger then holds on the new primary:
every acknowledged write there exactly once, every unknown one settled by
a retry with its key. Writes in flight answer UNAVAILABLE (or
DEADLINE_EXCEEDED), never INTERNAL or FAILED_PRECONDITION.

Three times: with a multi-host DATABASE_URL (`primary,standby`, the pool
staying on the one that takes writes: target_session_attrs=read-write);
with one address (the suite's TCP proxy) re-pointed to the standby as
soon as the primary dies, before its promotion, as a DNS or endpoint flip
would: until the promotion the service meets a standby there and must not
stay on it; and multi-host again with the primary behind the proxy,
blackholed before the kill, so that it goes silent instead of resetting
(a lost host, a partition): statements running there end only at their
calls' deadlines, and new connections must not wait on it.

The unavailability window (promotion requested -> first write acknowledged
again; target 5 s) is printed in pytest's summary.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import grpc
import pytest
from grpc_health.v1 import health_pb2_grpc

from devcluster.cluster import Cluster, promote_standby
from devcluster.process import json_records
from devcluster.throwaway import throwaway_cluster
from orderstream.events.v1 import event_service_pb2, event_service_pb2_grpc
from orderstream.orders.v1 import order_service_pb2_grpc
from service.db.migrate import migrate
from tests.faults.calls import NOT_SERVING, SERVING, HealthWatch
from tests.faults.cluster import Admin, FaultCluster, kill_server
from tests.faults.conftest import Scenario
from tests.faults.invariants import check_at_rest
from tests.faults.ledger import Ledger, order_request, publish_request, upload_messages
from tests.faults.service import RunningProcess, channel_to, running_process, service_env
from tests.faults.tally import TALLY
from tests.support.database import connect_to, multi_host_dsn, through_proxy
from tests.support.polling import eventually
from tests.support.requests import unique
from tests.support.status import rpc_error
from tests.support.tcp_proxy import TcpProxy

pytestmark = pytest.mark.slow

TARGET_WINDOW = 5.0  # seconds from the promotion to the first acknowledged write
# Writes acknowledged before the kill, and of each kind after the promotion.
BEFORE, AFTER = 20, 3


@pytest.fixture
def scenario() -> Scenario:
    """The suite's `scenario` counts this test in the tally; its invariants
    are checked on the new primary, by the test itself."""
    return Scenario()


@dataclass(frozen=True)
class Pair:
    primary: Cluster
    standby: Cluster


@contextlib.asynccontextmanager
async def replicated_pair() -> AsyncIterator[Pair]:
    """A durable primary with the schema, and a hot standby of it that the
    primary waits for at every commit. The clusters start and stop in a
    thread (pg_ctl blocks)."""
    stack = contextlib.ExitStack()
    try:
        primary = await asyncio.to_thread(
            stack.enter_context,
            throwaway_cluster("orderstream-failover-primary-", durable=True, stop_mode="immediate"),
        )
        async with connect_to(primary, primary.database) as conn:
            await migrate(conn)  # as the schema's owner, before the standby is copied
        standby = await asyncio.to_thread(
            stack.enter_context,
            throwaway_cluster(
                "orderstream-failover-standby-",
                durable=True,
                stop_mode="immediate",
                standby_of=primary,
            ),
        )
        await _make_synchronous(primary, standby)
        yield Pair(primary, standby)
    finally:
        await asyncio.to_thread(stack.close)


async def _make_synchronous(primary: Cluster, standby: Cluster) -> None:
    """Only now: the standby copied the primary's configuration, and as a
    lone promoted primary it must not wait for a standby of its own."""
    # The standby's WAL receiver names itself after its base directory
    # (devcluster/cluster.py's primary_conninfo).
    name = standby.base_dir.name
    async with connect_to(primary, "postgres", admin=True) as conn:
        assert await conn.fetchval("SHOW synchronous_commit") == "on"
        await conn.execute(f"ALTER SYSTEM SET synchronous_standby_names = '\"{name}\"'")
        await conn.execute("SELECT pg_reload_conf()")

        async def synchronous() -> bool:
            state = await conn.fetchval(
                "SELECT sync_state FROM pg_stat_replication WHERE application_name = $1", name
            )
            return bool(state == "sync")

        await eventually(synchronous, timeout=30, what="the standby to replicate synchronously")


@dataclass
class Attempt:
    kind: str
    started: float
    ended: float
    code: grpc.StatusCode


async def write_loop(
    kind: str,
    write: Callable[[str], Awaitable[grpc.StatusCode]],
    attempts: list[Attempt],
    stop: asyncio.Event,
) -> None:
    """One caller writing with a new key each time until `stop`, backing
    off briefly after an error, as a client would."""
    while not stop.is_set():
        started = time.monotonic()
        code = await write(unique(f"failover-{kind}"))
        attempts.append(Attempt(kind, started, time.monotonic(), code))
        if code != grpc.StatusCode.OK:
            await asyncio.sleep(0.05)


def acknowledged_since(attempts: list[Attempt], moment: float, kind: str | None = None) -> int:
    return sum(
        1
        for a in attempts
        if a.code == grpc.StatusCode.OK and a.started >= moment and kind in (None, a.kind)
    )


def back_after(attempts: list[Attempt], moment: float, kind: str | None = None) -> float:
    """Seconds from `moment` to the first acknowledgement of a write sent after it."""
    return (
        min(
            a.ended
            for a in attempts
            if a.code == grpc.StatusCode.OK and a.started >= moment and kind in (None, a.kind)
        )
        - moment
    )


async def write_while_down(
    ledger: Ledger, orders: order_service_pb2_grpc.OrderServiceStub
) -> str | None:
    """A CreateOrder while no server takes writes: UNAVAILABLE, recorded
    in the ledger (its outcome is unknown to a caller); its ErrorInfo reason."""
    request = order_request(unique("failover-down"))
    failed = await rpc_error(orders.CreateOrder(request, timeout=5))
    ledger.record("order", request.request_id, [request], failed.code)
    assert failed.code == grpc.StatusCode.UNAVAILABLE
    assert failed.retry_info is not None
    return failed.error_info.reason if failed.error_info is not None else None


async def follow(
    events: event_service_pb2_grpc.EventServiceStub, after_id: int, received: list[int]
) -> None:
    """One follow stream, read until cancelled: it must not end, the
    failover notwithstanding."""
    call = events.StreamEvents(
        event_service_pb2.StreamEventsRequest(after_id=after_id, follow=True)
    )
    async for response in call:
        received.extend(event.id for event in response.events)


@pytest.mark.parametrize("address", ["multi-host", "re-pointed", "blackholed"])
async def test_the_primary_dies_and_the_standby_is_promoted(scenario, address):
    async with replicated_pair() as pair, contextlib.AsyncExitStack() as stack:
        proxy = None
        if address == "multi-host":
            # The primary first, then the standby, both at 127.0.0.1 (their
            # certificate, the same one, names it).
            url = multi_host_dsn(
                pair.primary, f"127.0.0.1:{pair.primary.port}", f"127.0.0.1:{pair.standby.port}"
            )
        elif address == "blackholed":
            # The same, the primary behind the proxy: its machine goes
            # silent (no reset, no refusal), as a lost host or a partition.
            proxy = await stack.enter_async_context(TcpProxy(pair.primary.port))
            url = multi_host_dsn(
                pair.primary, f"127.0.0.1:{proxy.port}", f"127.0.0.1:{pair.standby.port}"
            )
        else:
            proxy = await stack.enter_async_context(TcpProxy(pair.primary.port))
            url = through_proxy(pair.primary, proxy.port).dsn()
        env = service_env(
            pair.primary,
            DATABASE_URL=url,
            ORDERSTREAM_REPLICA_DATABASE_URL=pair.standby.dsn(),
        )
        service = await stack.enter_async_context(running_process(env))
        channel = await stack.enter_async_context(channel_to(service.target))
        await _fail_over(scenario, pair, proxy, service, channel, address)


async def _fail_over(
    scenario: Scenario,
    pair: Pair,
    proxy: TcpProxy | None,
    service: RunningProcess,
    channel: grpc.aio.Channel,
    address: str,
) -> None:
    ledger = scenario.ledger
    orders = order_service_pb2_grpc.OrderServiceStub(channel)
    events = event_service_pb2_grpc.EventServiceStub(channel)
    watch = HealthWatch(health_pb2_grpc.HealthStub(channel))
    await watch.saw(SERVING)
    async with connect_to(pair.primary, pair.primary.database, admin=True) as conn:
        start = await conn.fetchval("SELECT coalesce(max(id), 0) FROM events")
    received: list[int] = []
    follower = asyncio.ensure_future(follow(events, start, received))

    attempts: list[Attempt] = []
    stop = asyncio.Event()
    writers = {
        "order": lambda key: ledger.create_order(orders, order_request(key), timeout=5),
        "publish": lambda key: ledger.publish(events, publish_request(key, 3), timeout=5),
        "upload": lambda key: ledger.upload(
            events, upload_messages(key, events=20, per_message=10), timeout=10
        ),
    }
    loads = [
        asyncio.ensure_future(write_loop(kind, write, attempts, stop))
        for kind, write in (*writers.items(), *writers.items())
    ]
    try:

        async def written(moment: float, count: int, kinds: tuple[str | None, ...]) -> bool:
            return all(acknowledged_since(attempts, moment, kind) >= count for kind in kinds)

        await eventually(
            lambda: written(0.0, BEFORE, (None,)), timeout=30, what="writes before the kill"
        )
        if address == "blackholed":
            proxy.blackhole()
        await asyncio.to_thread(kill_server, pair.primary)
        killed = time.monotonic()  # after: a write sent before may still be acknowledged
        if address == "re-pointed":
            # The endpoint flips ahead of the promotion: until it is done, new
            # connections meet a standby behind the one address.
            proxy.repoint(pair.standby.port)
        await watch.saw(SERVING, NOT_SERVING)
        # No writable server: retryable, saying why. A multi-host URL finds
        # the primary's host refusing; the one address, a standby there.
        reason = await write_while_down(ledger, orders)
        assert reason == (
            "DATABASE_READ_ONLY" if address == "re-pointed" else "DATABASE_UNAVAILABLE"
        )
        promoting = time.monotonic()
        await asyncio.to_thread(promote_standby, pair.standby)
        promoted = time.monotonic()
        await watch.saw(SERVING, NOT_SERVING, SERVING)
        await eventually(
            lambda: written(promoting, AFTER, tuple(writers)),
            timeout=60,
            what="writes of every kind acknowledged on the new primary",
        )
    finally:
        stop.set()
        await asyncio.gather(*loads)
        await watch.close()

    window = back_after(attempts, promoting)
    by_kind = ", ".join(f"{kind} {back_after(attempts, promoting, kind):.2f} s" for kind in writers)
    TALLY.notes.append(
        f"failover [{address}]: writes back {window:.2f} s after the promotion was asked "
        f"({by_kind}), {back_after(attempts, killed):.2f} s after the kill; "
        f"pg_ctl promote took {promoted - promoting:.2f} s"
    )
    codes = {a.code for a in attempts}
    assert codes <= {
        grpc.StatusCode.OK,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }, codes

    admin = Admin(FaultCluster.running(pair.standby))
    await admin.open()
    try:
        # The invariants, on the new primary: the ledger first (its retries
        # write too), then the follower, which must be gone before the
        # service can be at rest.
        TALLY.totals.add(await ledger.settle(channel, admin))
        stored = [
            row["id"]
            for row in await admin.fetch("SELECT id FROM events WHERE id > $1 ORDER BY id", start)
        ]

        async def caught_up() -> bool:
            if follower.done():
                follower.result()  # the stream's error, or its end
                raise AssertionError("the follow stream ended")
            return bool(received) and received[-1] >= stored[-1]

        try:
            await eventually(caught_up, timeout=30, what="the follower to reach the newest event")
        finally:
            if not follower.done():
                follower.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await follower
        assert received == stored, "the follower saw a gap or a duplicate"
        await check_at_rest(service.target, admin)
    finally:
        await admin.close()

    internal = [
        r for r in json_records(service.child.lines) if r.get("message") == "internal error"
    ]
    assert not internal, internal
    # The feed's LISTEN connection came back, on the new primary.
    listening = [
        r for r in json_records(service.child.lines) if r.get("message") == "event feed listening"
    ]
    assert len(listening) >= 2, "the feed did not listen again after the failover"

    # The replica monitor measures against the new primary (here the
    # replica URL's node itself, whose reads it may serve again).
    async def replica_usable() -> bool:
        return (await service.target.metrics())["orderstream_replica_usable"] == 1

    await eventually(replica_usable, timeout=30, what="the replica to be used again")
    assert window <= TARGET_WINDOW, f"writes came back {window:.2f} s after the promotion"
