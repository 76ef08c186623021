"""The process's gRPC servers: several grpc.aio servers on one port and one
event loop, each accepting calls on its own (ORDERSTREAM_ACCEPTORS).

Why more than one: a grpc.aio server (grpcio 1.85) asks gRPC core for the
next call (of each registered method, or, for the generic handlers the
service uses, of any method) only once the loop has run the arrival of the
previous one, so it takes in at most one new call per turn of the loop, and
each arrival is its own trip from gRPC's completion-queue thread to the
loop. Servers that share the port (SO_REUSEPORT: the kernel spreads new
connections over their sockets) each have a call request out, so calls
arriving on different connections are taken in side by side and their
arrivals handled in one wake-up of the loop. Measured on GetOrder at 16
concurrent calls over 16 connections, 32 acceptors against one made about
1.5 times the calls a second on a third less CPU a call
(docs/benchmarks.md#acceptors).

A connection belongs to one acceptor for its life, so the calls of a
single connection gain nothing; many connections (many callers, several
channels, the load balancer's) do. Every acceptor serves the same servicer
objects, so the bounds that matter (calls in progress, stream slots,
followers, health watches) stay per process.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

import grpc


class Acceptors:
    """`count` servers made by `make`, listening on one port, started and
    stopped together."""

    def __init__(self, count: int, make: Callable[[], grpc.aio.Server]) -> None:
        if count < 1:
            raise ValueError("at least one acceptor")
        self._servers = tuple(make() for _ in range(count))

    def __iter__(self) -> Iterator[grpc.aio.Server]:
        return iter(self._servers)

    def __len__(self) -> int:
        return len(self._servers)

    def listen(self, bind: Callable[[grpc.aio.Server, int], int], port: int) -> int:
        """Binds the first server to `port` (0: a free one) with `bind`,
        then the others to the port it got; returns that port."""
        first, *others = self._servers
        bound = bind(first, port)
        for server in others:
            bind(server, bound)
        return bound

    async def start(self) -> None:
        for server in self._servers:
            await server.start()

    def stop(self, grace: float | None) -> asyncio.Future[list[None]]:
        """Stops them all at once: each refuses new calls and lets its own
        calls finish within the grace. Not a coroutine: every server's stop
        is queued on the loop when this returns, ahead of anything the
        caller queues next (app.py relies on it: new calls are refused
        before any health watcher hears NOT_SERVING)."""
        return asyncio.gather(*(server.stop(grace) for server in self._servers))
