"""Which database serves a read: the replica where lag is harmless, else the primary.

Per RPC (docs/scaling.md, "Read replica", has the same table):

    ListOrders, ExportOrders   replica   pages and bulk exports of orders a
                                         caller did not just write; a few
                                         seconds of lag (ORDERSTREAM_REPLICA_MAX_LAG
                                         at most) only means the newest orders
                                         appear a little later. Keyset page
                                         tokens (the last id) never repeat rows
                                         when one page comes from the replica
                                         and the next from the primary; a row
                                         the replica had not replayed yet counts
                                         as committed during the walk (which
                                         may miss it, as the paging rules say).
    GetOrder, GetEvent         primary   read-your-writes: callers read back
                                         what CreateOrder, UpdateOrderStatus and
                                         PublishEvents just returned.
    StreamEvents (history      primary   the gap-free safe horizon
    and follow)                          (migrations/0002_streaming.sql) reads
                                         the primary's lock table and sequence.
                                         On a hot standby neither is right: the
                                         primary's advisory locks are not
                                         replicated, and sequences are WAL-logged
                                         up to 32 values ahead. Measured on a real
                                         standby (tests/test_replica.py): with
                                         event 1 uncommitted on the primary, the
                                         primary's horizon was 1 and the
                                         standby's 34, so a history read there
                                         would skip event 1 for good. Follow mode
                                         also needs the primary's LISTEN.
    every write (Create,       primary   the standby is read-only; idempotency
    Update, Publish, Upload,             replays read on the primary too.
    Import)

A read goes to the replica only while ReplicaMonitor calls it usable. If the
replica fails before anything was sent to the caller (cannot connect, the
connection breaks, a query times out, the standby cancels the query over a
replication conflict), the call runs again on the primary and the caller sees no error;
a broken connection also marks the replica down until the next check. Once
rows are on the wire the error is the caller's, as on the primary.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import asyncpg

from service.db.failures import NoConnection
from service.db.replica import ReplicaMonitor
from service.db.runner import Database

T = TypeVar("T")

PRIMARY = "primary"
REPLICA = "replica"
# The replica is gone or going: worth marking down.
_REPLICA_LOST = (
    OSError,  # TimeoutError among them: a query the replica did not answer in time
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,  # see service/db/pool.py's DATABASE_FAILURES
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.InvalidAuthorizationSpecificationError,
)


@dataclass
class Sent:
    """Set by a routed read before it first writes to the caller: from then
    on it can no longer move to the primary."""

    anything: bool = False


Read = Callable[[Database, Sent], Awaitable[T]]


class ReadRouter:
    def __init__(
        self,
        primary: Database,
        replica: Database | None = None,
        monitor: ReplicaMonitor | None = None,
        on_served: Callable[[str, str], None] | None = None,
    ) -> None:
        self._primary = primary
        self._replica = replica
        self._monitor = monitor
        self._on_served = on_served or (lambda _method, _pool: None)

    async def read(self, method: str, work: Read[T]) -> T:
        """Runs `work` on the replica if it is usable, else (or if it fails
        before sending anything) on the primary."""
        if self._replica is None or self._monitor is None:
            # No replica: nothing to route, and nothing worth counting (the
            # rpcs counter already counts these calls).
            return await work(self._primary, Sent())
        if not self._monitor.usable:
            return await self._on_primary(method, work)
        sent = Sent()
        try:
            result = await work(self._replica, sent)
        except _REPLICA_LOST as exc:
            if sent.anything:
                raise
            await self._monitor.mark_down(f"a call lost it: {type(exc).__name__}")
            return await self._on_primary(method, work)
        except NoConnection:
            # No replica connection in time: a connect that hangs (a host
            # that drops packets) or a busy pool; the next check tells which.
            if sent.anything:
                raise
            await self._monitor.mark_down("no connection within the acquire timeout")
            return await self._on_primary(method, work)
        except asyncpg.SerializationError:
            # The standby cancelled the query over a replication conflict;
            # the replica itself is fine.
            if sent.anything:
                raise
            return await self._on_primary(method, work)
        self._on_served(method, REPLICA)
        return result

    async def _on_primary(self, method: str, work: Read[T]) -> T:
        result = await work(self._primary, Sent())
        self._on_served(method, PRIMARY)
        return result
