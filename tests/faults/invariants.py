"""The invariants every fault scenario must leave intact, checked by one
function after each of them (through the `scenario` fixture):

1. the ledger holds (see ledger.py), unknown writes settled by retrying;
2. the service's pool is back to its baseline: no connection in use, no
   call waiting for one, no stream open (read from its metrics endpoint,
   as Prometheus would);
3. no service backend is idle in a transaction or still running a
   statement, other than the service's own health check and feed.
"""

from __future__ import annotations

import grpc

from tests.faults.cluster import Admin
from tests.faults.ledger import Ledger, Totals
from tests.faults.service import Target
from tests.support.polling import eventually

# What a healthy idle service runs on its own: the health check and the
# feed's horizon poll (service/rpc/health.py, service/events/feed.py).
_BACKGROUND_QUERIES = ("pg_is_in_recovery", "events_safe_horizon")
_SETTLE_SECONDS = 30.0


async def pool_at_baseline(target: Target) -> bool:
    samples = await target.metrics()
    streams = sum(v for k, v in samples.items() if k.startswith("orderstream_active_streams{"))
    return (
        samples["orderstream_pool_in_use"] == 0
        and samples["orderstream_pool_waiting"] == 0
        and samples["orderstream_pool_size"] <= samples["orderstream_pool_max_size"]
        and streams == 0
    )


async def leftover_backends(admin: Admin) -> list[str]:
    """Service backends in a transaction, or running anything but the
    service's own background queries."""
    leftovers = []
    for row in await admin.service_backends():
        state = row["state"] or ""
        background = any(fragment in (row["query"] or "") for fragment in _BACKGROUND_QUERIES)
        if state.startswith("idle in transaction") or (state == "active" and not background):
            leftovers.append(f"pid {row['pid']} {state}: {row['query'][:80]!r}")
    return leftovers


async def check_invariants(
    target: Target, admin: Admin, ledger: Ledger, channel: grpc.aio.Channel
) -> Totals:
    totals = await ledger.settle(channel, admin)
    await check_at_rest(target, admin)
    return totals


async def check_at_rest(target: Target, admin: Admin) -> None:
    """Invariants 2 and 3: the pool at its baseline, no leftover backends."""
    try:
        await eventually(
            lambda: pool_at_baseline(target),
            timeout=_SETTLE_SECONDS,
            what="the service's pool to return to its baseline",
        )
    except AssertionError as error:
        samples = await target.metrics()
        seen = {k: v for k, v in samples.items() if "pool_" in k or "active_streams" in k}
        raise AssertionError(f"{error}: {seen}") from None

    async def no_leftovers() -> bool:
        return not await leftover_backends(admin)

    try:
        await eventually(no_leftovers, timeout=_SETTLE_SECONDS, what="no leftover backends")
    except AssertionError:
        raise AssertionError(f"leftover backends: {await leftover_backends(admin)}") from None
