"""The ceiling: a bare grpc.aio OrderService with no database.

    python -m bench.ceiling_server RESPONSES.json [--workers N] [--loop uvloop|asyncio]

Answers GetOrder, CreateOrder and ListOrders with responses captured from
orderstream (same messages, same sizes; RESPONSES.json maps method name to the
serialised message in hex), so the difference to orderstream is exactly the
database work and the code around it. With `--round-trip`, GetOrder first
runs `SELECT 1` through the service's own pool: what one database round trip
costs inside grpc.aio, with no SQL of substance and no service code.
Parses each request and serialises each response like any servicer. Started
and read like the service: one JSON "serving" line with the port on stderr;
SIGTERM stops it.
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

import asyncpg
import grpc

from orderstream.orders.v1 import order_pb2, order_service_pb2, order_service_pb2_grpc
from service.db.pool import open_pool
from service.settings import Settings


class CannedOrders(order_service_pb2_grpc.OrderServiceServicer):
    def __init__(self, responses: dict[str, bytes], pool: asyncpg.Pool | None) -> None:
        self._pool = pool
        self._order = order_pb2.Order.FromString(responses["GetOrder"])
        self._created = order_pb2.Order.FromString(responses["CreateOrder"])
        self._page = order_service_pb2.ListOrdersResponse.FromString(responses["ListOrders"])

    async def GetOrder(self, request, context):  # type: ignore[no-untyped-def]
        if self._pool is not None:
            async with self._pool.acquire() as conn:
                await conn.fetchval("SELECT 1")
        return self._order

    async def CreateOrder(self, request, context):  # type: ignore[no-untyped-def]
        return self._created

    async def ListOrders(self, request, context):  # type: ignore[no-untyped-def]
        return self._page


async def _serve(port: int, responses: dict[str, bytes], ready: int, round_trip: bool) -> None:
    # The service's own pool: verified TLS, same codecs, same release path.
    pool = await open_pool(Settings.from_env(os.environ)) if round_trip else None
    server = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
    order_service_pb2_grpc.add_OrderServiceServicer_to_server(CannedOrders(responses, pool), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    os.write(ready, b".")
    stopping = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
    await stopping.wait()
    await server.stop(0)


def _worker(
    port: int, responses: dict[str, bytes], ready: int, loop: str, round_trip: bool
) -> None:
    serve = _serve(port, responses, ready, round_trip)
    if loop == "uvloop":
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
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("responses", type=Path)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument(
        "--round-trip",
        action="store_true",
        help="GetOrder first runs SELECT 1 on a pool from DATABASE_URL (the service's settings)",
    )
    args = parser.parse_args()
    responses = {k: bytes.fromhex(v) for k, v in json.loads(args.responses.read_text()).items()}
    reserved = _reserve_port()
    port = reserved.getsockname()[1]
    ready_read, ready_write = os.pipe()
    # Fork before any gRPC object exists: gRPC's state does not survive a fork.
    children = []
    for _ in range(args.workers):
        pid = os.fork()
        if pid == 0:
            os.close(ready_read)
            _worker(port, responses, ready_write, args.loop, args.round_trip)
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
