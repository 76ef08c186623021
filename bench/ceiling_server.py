"""The ceiling: a bare grpc.aio OrderService with no database.

    python -m bench.ceiling_server RESPONSES.json [--workers N]
        [--loop uvloop|asyncio] [--wait WAIT] [--batch-file PATH]

Answers GetOrder, CreateOrder and ListOrders with responses captured from
orderstream (same messages, same sizes; RESPONSES.json maps method name to the
serialised message in hex), so the difference to orderstream is exactly the
database work and the code around it. Parses each request and serialises
each response like any servicer.

`--wait` makes GetOrder wait before it answers, for what one wait costs
inside grpc.aio with no SQL of substance and no service code
(bench/round_trip.py compares them; bench/unary.py uses `pool`):

- `none`: answers at once (the ceiling, the default);
- `yield`: `await asyncio.sleep(0)`, one turn of the loop;
- `timer`: a future a 200 µs timer completes, a wait with no I/O;
- `pool`: `SELECT 1` through the service's own pool (DATABASE_URL and the
  service's settings: verified TLS, same codecs, same release path);
- `select`: `SELECT 1` on a connection of its own, taken from that pool
  once (no acquire per call);
- `coalesced`: `SELECT 1` shared by the calls that arrive while one is in
  flight (at most one statement at a time); the mean number of calls per
  statement is written to `--batch-file` at exit.

Started and read like the service: one JSON "serving" line with the port on
stderr; SIGTERM stops it. With one worker (the default) it serves in its own
process, so its pid is the serving process's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import asyncpg
import grpc

from orderstream.orders.v1 import order_pb2, order_service_pb2, order_service_pb2_grpc
from service.db.pool import open_pool
from service.ops import memory
from service.settings import Settings

WAITS = ("none", "yield", "timer", "pool", "select", "coalesced")
TIMER_S = 0.0002
DEDICATED_CONNECTIONS = 16  # `select`: one per call in flight (at most the pool's size)


class Coalescer:
    """At most one `SELECT 1` in flight; calls that arrive meanwhile share
    the next one."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn
        self._waiting: list[asyncio.Future[None]] = []
        self._running = False
        self._drainer: asyncio.Task[None] | None = None
        self.statements = 0
        self.calls = 0

    def wait(self) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._waiting.append(future)
        if not self._running:
            self._running = True
            self._drainer = loop.create_task(self._drain())
        return future

    async def _drain(self) -> None:
        try:
            while self._waiting:
                batch, self._waiting = self._waiting, []
                await self._conn.fetchval("SELECT 1")
                self.statements += 1
                self.calls += len(batch)
                for future in batch:
                    if not future.done():
                        future.set_result(None)
        finally:
            self._running = False


class Wait:
    """What GetOrder waits for before answering (`--wait`)."""

    def __init__(self, kind: str, pool: asyncpg.Pool | None) -> None:
        self.kind = kind
        self._pool = pool
        self._conns: asyncio.Queue[Any] = asyncio.Queue()
        self.coalescer: Coalescer | None = None

    async def open(self) -> None:
        assert self._pool is not None or self.kind in ("none", "yield", "timer")
        if self.kind == "select":
            pool: asyncpg.Pool = self._pool  # type: ignore[assignment]
            for _ in range(min(DEDICATED_CONNECTIONS, pool.get_max_size())):
                self._conns.put_nowait(await pool.acquire())
        elif self.kind == "coalesced":
            self.coalescer = Coalescer(await self._pool.acquire())  # type: ignore[union-attr]

    async def __call__(self) -> None:
        kind = self.kind
        if kind == "yield":
            await asyncio.sleep(0)
        elif kind == "timer":
            loop = asyncio.get_running_loop()
            done = loop.create_future()
            loop.call_later(TIMER_S, done.set_result, None)
            await done
        elif kind == "pool":
            async with self._pool.acquire() as conn:  # type: ignore[union-attr]
                await conn.fetchval("SELECT 1")
        elif kind == "select":
            conn = await self._conns.get()
            try:
                await conn.fetchval("SELECT 1")
            finally:
                self._conns.put_nowait(conn)
        elif kind == "coalesced":
            await self.coalescer.wait()  # type: ignore[union-attr]


class CannedOrders(order_service_pb2_grpc.OrderServiceServicer):
    def __init__(self, responses: dict[str, bytes], wait: Wait) -> None:
        self._wait = wait
        self._order = order_pb2.Order.FromString(responses["GetOrder"])
        self._created = order_pb2.Order.FromString(responses["CreateOrder"])
        self._page = order_service_pb2.ListOrdersResponse.FromString(responses["ListOrders"])

    async def GetOrder(self, request, context):  # type: ignore[no-untyped-def]
        if self._wait.kind != "none":
            await self._wait()
        return self._order

    async def CreateOrder(self, request, context):  # type: ignore[no-untyped-def]
        return self._created

    async def ListOrders(self, request, context):  # type: ignore[no-untyped-def]
        return self._page


async def _serve(
    port: int, responses: dict[str, bytes], ready: int | None, args: argparse.Namespace
) -> None:
    with_database = args.wait in ("pool", "select", "coalesced")
    pool = await open_pool(Settings.from_env(os.environ)) if with_database else None
    wait = Wait(args.wait, pool)
    await wait.open()
    server = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
    order_service_pb2_grpc.add_OrderServiceServicer_to_server(CannedOrders(responses, wait), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    if ready is None:
        print(json.dumps({"message": "serving", "port": port}), file=sys.stderr, flush=True)
    else:
        os.write(ready, b".")
    stopping = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, stopping.set)
    await stopping.wait()
    await server.stop(0)
    if wait.coalescer is not None and args.batch_file is not None:
        batch = wait.coalescer.calls / max(1, wait.coalescer.statements)
        args.batch_file.write_text(str(batch))


def _worker(
    port: int, responses: dict[str, bytes], ready: int | None, args: argparse.Namespace
) -> None:
    serve = _serve(port, responses, ready, args)
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(serve)
    else:
        asyncio.run(serve)


def _reserve_port() -> socket.socket:
    """Holds a free port (SO_REUSEPORT, never listening) for the workers to share."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("responses", type=Path)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument("--wait", choices=WAITS, default="none", help="what GetOrder waits for")
    parser.add_argument("--batch-file", type=Path, help="`coalesced`: where its mean batch goes")
    args = parser.parse_args()
    memory.keep_reads_off_mmap()  # as the service's processes do
    responses = {k: bytes.fromhex(v) for k, v in json.loads(args.responses.read_text()).items()}
    reserved = _reserve_port()
    port = reserved.getsockname()[1]
    if args.workers == 1:
        _worker(port, responses, None, args)
        return
    ready_read, ready_write = os.pipe()
    # Fork before any gRPC object exists: gRPC's state does not survive a fork.
    children = []
    for _ in range(args.workers):
        pid = os.fork()
        if pid == 0:
            os.close(ready_read)
            _worker(port, responses, ready_write, args)
            os._exit(0)
        children.append(pid)
    os.close(ready_write)
    # Only now: the workers must keep default signal handling of their own.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    for _ in children:
        if not os.read(ready_read, 1):
            sys.exit("a ceiling worker died before serving")
    print(json.dumps({"message": "serving", "port": port}), file=sys.stderr, flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    for pid in children:
        os.kill(pid, signal.SIGTERM)
    for pid in children:
        os.waitpid(pid, 0)


if __name__ == "__main__":
    main()
