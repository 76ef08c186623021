"""Reads as the tables grow (issue 21): every read shape's latency through
the service at each table size, once PostgreSQL has settled on its plans.

    python -m bench.scale [--sizes 100k,1M] [--calls 200] [--budget 15]

One durable cluster and one `python -m service serve` (pool of 4). For each
size in turn, orders and events are appended up to it in SQL
(devcluster/sample_data.py: realistic spreads, 10,000 rows a day), then
for every read shape: 10 rounds of 4 concurrent calls per pooled connection
(so that each statement has run at least ten times on each connection, past
the five custom plans after which `plan_cache_mode = auto` may switch to a
generic plan), then `--calls` sequential calls (fewer for a slow shape, as many as
`--budget` seconds allow, at least 20), p50 and p99. Streams are timed to
their 500th event (then cancelled) or their end. The safe-horizon
query is a SQL function with no RPC of its own: it is timed on a pool opened
as the service opens its own. Then ingest: CreateOrder and PublishEvents
(one event) calls/s, one at a time, and UploadEvents rows/s; and each table's
and index's size per million rows.

Prints a table per size as it goes, then p99 at the largest size against
the smallest (the cost growth) and the targets: every indexed read's p99 at
the largest size at most 2x at the smallest, and a filtered StreamEvents
fetch of 500 rows (one rare type's last 500 events) under 10 ms
at p99 at the largest size. Writes
bench/results/scale.json. `make bench` runs the default sizes; the issue's
figures are `--sizes 1M,10M` (about an hour, and some 15 GB of disk).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import itertools
import secrets
import ssl
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from bench.grpc_load import line_items
from bench.harness import cluster, save, service
from bench.streaming import upload_messages
from devcluster import sample_data
from devcluster.cluster import Cluster
from orderstream.events.v1 import event_pb2, event_service_pb2, event_service_pb2_grpc
from orderstream.orders.v1 import order_pb2, order_service_pb2, order_service_pb2_grpc
from service.db.pool import close_pool, open_pool
from service.events.sql import SAFE_HORIZON
from service.orders.page_token import PageTokens
from service.orders.sql import LIST_FILTERS, NO_END
from service.settings import Settings

POOL = 4
ROUNDS = 10  # calls per pooled connection before measuring
MIN_CALLS = 20
STREAM_ROWS = 500  # a history fetch is timed to this many events
# About 0.3% of the sample's events: the rare type the history shapes filter by.
RARE_TYPE = "com.example.t5"
# "Near the end" starts before the last STREAM_ROWS events of the rare type,
# counted, so that at every size the fetch the latency target is
# about reads the same rows: 500, to the end of the feed. (A start a fixed
# distance back held 502 of them at 1M and more than a first page at 10M in
# one run: different work, compared as if it were the same.) From the
# start, and with a second type from near the end, a stream reads more than
# its first page (service/events/sql.py: FIRST_PAGE_ROWS): the client leaves
# after its 500th event while the next page is on its way.
TARGET_SHAPE = "StreamEvents types, from near end"
TARGET_GROWTH = 2.0
TARGET_STREAM_P99_MS = 10.0
DAY = 86_400
# The sample's first day: a window that ends where most of the table follows.
FIRST_DAY = sample_data.created_time(0)
INGEST_CALLS = 200
UPLOAD_EVENTS = 50_000

Call = Callable[[], Awaitable[int]]


def size_list(text: str) -> list[int]:
    units = {"k": 1_000, "m": 1_000_000}
    sizes = []
    for part in filter(None, (p.strip().lower() for p in text.split(","))):
        scale = units.get(part[-1], 1)
        sizes.append(int(float(part.rstrip("km")) * scale))
    if not sizes or sizes != sorted(sizes) or sizes[0] < 10_000:
        raise argparse.ArgumentTypeError("ascending sizes of at least 10k, e.g. 100k,1M")
    return sizes


def stamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def fingerprint(request: order_service_pb2.ListOrdersRequest) -> bytes:
    """As service/orders/service.py binds a page token to its filters (a
    token that does not match is INVALID_ARGUMENT, so a drift shows)."""
    filters = order_service_pb2.ListOrdersRequest()
    filters.CopyFrom(request)
    filters.page_size = 0
    filters.page_token = ""
    return hashlib.sha256(filters.SerializeToString(deterministic=True)).digest()


class Shapes:
    """The read shapes, as calls returning how many rows they received."""

    def __init__(
        self, channel: grpc.aio.Channel, size: int, tokens: PageTokens, near_end: int
    ) -> None:
        self.orders = order_service_pb2_grpc.OrderServiceStub(channel)
        self.events = event_service_pb2_grpc.EventServiceStub(channel)
        self.size = size
        self.tokens = tokens
        self.near_end = near_end  # the id before the rare type's last STREAM_ROWS events

    def all(self, now: float) -> dict[str, Call]:
        n = self.size
        # The sample's light tail: customers and subjects with few rows.
        customer, subject = f"c-{n // 10 - 1}", f"orders/{n // 10 - 1}"
        day_ago = stamp(now - DAY)
        pending = order_pb2.ORDER_STATUS_PENDING
        # Every set of ListOrders' filters, each with a selective value: a
        # light customer, PENDING (recent orders), the last day, the first
        # day, or with both bounds the first half of the last day.
        values = {"customer_id": customer, "status": pending}
        labels = {"customer_id": "customer", "status": "status PENDING"}
        lists: dict[str, dict[str, Any]] = {"ListOrders (first page)": {}}
        for count in range(1, len(LIST_FILTERS) + 1):
            for names in itertools.combinations(LIST_FILTERS, count):
                fields = {name: values[name] for name in names if name in values}
                label = [labels[name] for name in fields]
                after, before = "created_after" in names, "created_before" in names
                if after and before:
                    fields |= {"created_after": day_ago, "created_before": stamp(now - DAY / 2)}
                    label.append("created range (half of the last day)")
                elif after:
                    fields["created_after"] = day_ago
                    label.append("created_after (last day)")
                elif before:
                    fields["created_before"] = stamp(FIRST_DAY + DAY)
                    label.append("created_before (first day)")
                lists[f"ListOrders {' + '.join(label)}"] = fields
        shapes: dict[str, Call] = {
            "GetOrder": lambda: self.get_order(n // 2),
            "GetEvent": lambda: self.get_event(n // 2),
            **{name: self.list_call(fields) for name, fields in lists.items()},
            "ListOrders deep page (90%)": self.list_call({}, after=n * 9 // 10),
            "ExportOrders customer": self.export_call({"customer_id": customer}),
            "ExportOrders status + created_after": self.export_call(
                {"status": pending, "created_after": day_ago}
            ),
            "ExportOrders created_after (last day)": self.export_call({"created_after": day_ago}),
            "ExportOrders created range (first day)": self.export_call(
                {"created_after": stamp(FIRST_DAY), "created_before": stamp(FIRST_DAY + DAY)}
            ),
        }
        rare = [RARE_TYPE]
        for where, first_id in (("start", 0), ("near end", self.near_end)):
            shapes[f"StreamEvents types, from {where}"] = self.stream_call(first_id, types=rare)
            shapes[f"StreamEvents two types, from {where}"] = self.stream_call(
                first_id, types=[*rare, "com.example.t6"]
            )
            shapes[f"StreamEvents subject, from {where}"] = self.stream_call(
                first_id, subject=subject
            )
            shapes[f"StreamEvents types + subject, from {where}"] = self.stream_call(
                first_id, types=["order.created"], subject=subject
            )
        shapes["StreamEvents follower's start (types, 20k back)"] = self.stream_call(
            n - 20_000, types=rare, follow=True
        )
        return shapes

    async def get_order(self, order_id: int) -> int:
        await self.orders.GetOrder(order_service_pb2.GetOrderRequest(id=order_id))
        return 1

    async def get_event(self, event_id: int) -> int:
        await self.events.GetEvent(event_service_pb2.GetEventRequest(id=event_id))
        return 1

    def list_call(self, fields: dict[str, Any], after: int = 0) -> Call:
        request = order_service_pb2.ListOrdersRequest(page_size=50, **fields)
        if after:
            request.page_token = self.tokens.encode(after, NO_END, fingerprint(request))

        async def call() -> int:
            return len((await self.orders.ListOrders(request)).orders)

        return call

    def export_call(self, fields: dict[str, Any]) -> Call:
        request = order_service_pb2.ExportOrdersRequest(**fields)

        async def call() -> int:
            rows = 0
            async for message in self.orders.ExportOrders(request):
                rows += len(message.orders)
            return rows

        return call

    def stream_call(self, after: int, *, follow: bool = False, **fields: Any) -> Call:
        """Reads to the 500th event or the end; a follower to its first
        message (the history it catches up on)."""
        request = event_service_pb2.StreamEventsRequest(after_id=after, follow=follow, **fields)

        async def call() -> int:
            stream = self.events.StreamEvents(request)
            rows = 0
            try:
                async for message in stream:
                    rows += len(message.events)
                    if rows >= STREAM_ROWS or follow:
                        break
            finally:
                stream.cancel()
            return rows

        return call


async def timed(call: Call, calls: int, budget: float) -> dict[str, float]:
    """Warms `call` up on every pooled connection, then times it alone,
    `calls` times or, for a slow one, as often as `budget` seconds allow
    (at least MIN_CALLS)."""
    for _ in range(ROUNDS):
        await asyncio.gather(*(call() for _ in range(POOL)))
    seconds: list[float] = []
    rows = 0
    deadline = time.perf_counter() + budget
    while len(seconds) < calls and (len(seconds) < MIN_CALLS or time.perf_counter() < deadline):
        start = time.perf_counter()
        rows = await call()
        seconds.append(time.perf_counter() - start)
    seconds.sort()
    return {
        "p50_ms": statistics.median(seconds) * 1000,
        "p99_ms": seconds[min(len(seconds) - 1, int(len(seconds) * 0.99))] * 1000,
        "rows": rows,
        "calls": len(seconds),
    }


async def horizon(db: Cluster, calls: int, budget: float) -> dict[str, float]:
    """The safe-horizon query, on a pool opened as the service's."""
    pool = await open_pool(Settings.from_env(db.service_env()))
    try:

        async def call() -> int:
            await pool.fetchval(SAFE_HORIZON)
            return 1

        return await timed(call, calls, budget)
    finally:
        await close_pool(pool, 10)


# What the upload writes beyond the rows themselves as the tables grow: an
# index page an insert touches first after a checkpoint goes to the WAL
# whole (full_page_writes), and a larger index spreads a batch's inserts
# over more pages.
WAL_NOW = "SELECT pg_current_wal_insert_lsn()"


async def ingest(channel: grpc.aio.Channel, admin: asyncpg.Connection) -> dict[str, float]:
    orders = order_service_pb2_grpc.OrderServiceStub(channel)
    events = event_service_pb2_grpc.EventServiceStub(channel)
    run = secrets.token_hex(4)
    start = time.perf_counter()
    for i in range(INGEST_CALLS):
        await orders.CreateOrder(
            order_service_pb2.CreateOrderRequest(
                request_id=f"scale-{run}-{i}", customer_id="c-1", currency="EUR", items=line_items()
            )
        )
    create = INGEST_CALLS / (time.perf_counter() - start)
    event = event_pb2.Event(type="bench.scale", source="/bench", subject="orders/1")
    event.json_payload = '{"n": 1}'
    start = time.perf_counter()
    for _ in range(INGEST_CALLS):
        await events.PublishEvents(event_service_pb2.PublishEventsRequest(events=[event]))
    publish = INGEST_CALLS / (time.perf_counter() - start)
    messages = upload_messages(UPLOAD_EVENTS)
    before = await admin.fetchval(WAL_NOW)
    start = time.perf_counter()
    await events.UploadEvents(iter(messages))
    upload = UPLOAD_EVENTS / (time.perf_counter() - start)
    wal = await admin.fetchval(
        "SELECT pg_wal_lsn_diff($1, $2)", await admin.fetchval(WAL_NOW), before
    )
    return {
        "create_order_per_s": create,
        "publish_events_per_s": publish,
        "upload_rows_per_s": upload,
        "upload_wal_bytes_per_row": float(wal) / UPLOAD_EVENTS,
    }


NEAR_END = "SELECT id FROM events WHERE type = $1 ORDER BY id DESC OFFSET $2 LIMIT 1"

SIZES = """
SELECT c.relname AS name, pg_relation_size(c.oid) AS bytes
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = 'public' AND c.relkind IN ('r', 'i')
  AND (c.relname ~ '^(orders|order_items|events)' )
ORDER BY c.relname
"""


async def step(
    db: Cluster,
    admin: asyncpg.Connection,
    port: int,
    size: int,
    args: argparse.Namespace,
    key: bytes,
) -> dict[str, Any]:
    start = time.perf_counter()
    have = await admin.fetchval("SELECT count(*) FROM orders")
    await sample_data.fill(admin, orders=size - have, events=size - have, total=size)
    load_s = time.perf_counter() - start
    print(f"\n{size:,} orders and events (loaded in {load_s:.0f} s)", flush=True)
    print("| read | p50 ms | p99 ms | rows |\n|---|---:|---:|---:|", flush=True)
    reads: dict[str, dict[str, float]] = {}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        # A table too small to hold STREAM_ROWS of them reads them all.
        near_end = await admin.fetchval(NEAR_END, RARE_TYPE, STREAM_ROWS) or 0
        shapes = Shapes(channel, size, PageTokens(key), near_end)
        for name, call in shapes.all(sample_data.created_time(size)).items():
            reads[name] = await timed(call, args.calls, args.budget)
            r = reads[name]
            print(f"| {name} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['rows']} |", flush=True)
        reads["safe horizon (SQL)"] = await horizon(db, args.calls, args.budget)
        sampled = await admin.fetchval("SELECT max(id) FROM orders")
        rates = await ingest(channel, admin)
    # The orders ingest created carry today's time, and the sample orders
    # appended for the next size come after them in id order with times
    # years back: a table whose times go backwards at their ids, which the
    # service's writes never make (an order's time is its inserting
    # transaction's start). Left in, they sit in every later recent
    # creation-time window, millions of ids before the rest of it.
    await admin.execute("DELETE FROM order_items WHERE order_id > $1", sampled)
    await admin.execute("DELETE FROM orders WHERE id > $1", sampled)
    print(", ".join(f"{k} {v:,.0f}" for k, v in rates.items()), flush=True)
    rows = {t: await admin.fetchval(f"SELECT count(*) FROM {t}") for t in ("orders", "events")}
    rows["order_items"] = await admin.fetchval("SELECT count(*) FROM order_items")
    sizes = {}
    for record in await admin.fetch(SIZES):
        table = next(t for t in ("order_items", "orders", "events") if record["name"].startswith(t))
        sizes[record["name"]] = record["bytes"] / (rows[table] / 1e6) / 2**20
    return {
        "size": size,
        "rows": rows,
        "load_s": load_s,
        "reads": reads,
        "ingest": rates,
        "mib_per_million_rows": sizes,
    }


def checks(steps: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    first, last = steps[0]["reads"], steps[-1]["reads"]
    out: dict[str, dict[str, Any]] = {}
    for name in last:
        growth = last[name]["p99_ms"] / first[name]["p99_ms"]
        out[f"growth: {name}"] = {
            "value": growth,
            "target": f"<= {TARGET_GROWTH:g}",
            "met": growth <= TARGET_GROWTH,
        }
    target = last[TARGET_SHAPE]
    out[f"{TARGET_SHAPE} ({target['rows']} rows), p99 ms"] = {
        "value": target["p99_ms"],
        "target": f"< {TARGET_STREAM_P99_MS:g}",
        "met": target["p99_ms"] < TARGET_STREAM_P99_MS,
    }
    return out


async def measure(db: Cluster, args: argparse.Namespace) -> dict[str, Any]:
    key = secrets.token_bytes(24).hex()
    env = {
        "ORDERSTREAM_POOL_MIN_SIZE": str(POOL),
        "ORDERSTREAM_POOL_MAX_SIZE": str(POOL),
        # Room beyond the 4 concurrent warm-up calls: a cancelled stream
        # gives its slot back a moment after the client moves on.
        "ORDERSTREAM_MAX_STREAMS": str(2 * POOL),
        "ORDERSTREAM_PAGE_TOKEN_KEY": key,
    }
    admin = await asyncpg.connect(
        db.dsn(), ssl=ssl.create_default_context(cafile=str(db.certificates.ca_cert))
    )
    try:
        async with service(db, **env) as server:
            steps = [
                await step(db, admin, server.port, size, args, key.encode()) for size in args.sizes
            ]
    finally:
        await admin.close()
    return {
        "sizes": args.sizes,
        "calls": args.calls,
        "settings": env,
        "steps": steps,
        "checks": checks(steps),
    }


def report(results: dict[str, Any]) -> list[str]:
    steps = results["steps"]
    first, last = steps[0], steps[-1]
    a, b = f"{first['size']:,}", f"{last['size']:,}"
    lines = [
        f"| read | p50 / p99 ms at {a} | p50 / p99 ms at {b} | p99 growth |",
        "|---|---:|---:|---:|",
    ]
    for name, r in last["reads"].items():
        f = first["reads"][name]
        lines.append(
            f"| {name} | {f['p50_ms']:.2f} / {f['p99_ms']:.2f} | {r['p50_ms']:.2f} / "
            f"{r['p99_ms']:.2f} | {r['p99_ms'] / f['p99_ms']:.2f} |"
        )
    lines += ["", f"| ingest | at {a} | at {b} |", "|---|---:|---:|"]
    for k in last["ingest"]:
        lines.append(f"| {k} | {first['ingest'][k]:,.0f} | {last['ingest'][k]:,.0f} |")
    lines += ["", f"| relation | MiB per million rows at {a} | at {b} |", "|---|---:|---:|"]
    for k, v in last["mib_per_million_rows"].items():
        lines.append(f"| {k} | {first['mib_per_million_rows'].get(k, 0):.1f} | {v:.1f} |")
    lines += ["", "| target | measured | target | |", "|---|---:|---:|---|"]
    for k, c in results["checks"].items():
        verdict = "PASS" if c["met"] else "FAIL"
        lines.append(f"| {k} | {c['value']:.2f} | {c['target']} | {verdict} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=size_list, default=[100_000, 1_000_000])
    parser.add_argument("--calls", type=int, default=1000, help="timed calls per read shape")
    parser.add_argument(
        "--budget", type=float, default=15.0, help="seconds of timed calls per read shape, at most"
    )
    args = parser.parse_args()
    with cluster() as db:
        results = asyncio.run(measure(db, args))
    print("\n" + "\n".join(report(results)))
    print(f"\nwrote {save('scale', results)}")


if __name__ == "__main__":
    main()
