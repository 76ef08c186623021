"""`--workers N`: N server processes sharing one port through SO_REUSEPORT.

gRPC's own multi-core pattern for Python: the parent forks before any gRPC
object, event loop or pool exists (gRPC's core does not survive a fork once
it has started threads), each worker then builds its own loop, pool and
server and binds the same ports with `grpc.so_reuseport`, and the kernel
spreads new connections over them. The parent only forwards SIGTERM/SIGINT
(and SIGHUP, a reload) and reaps; if a worker dies on its own, the parent stops the others and
exits non-zero, so the pod restarts whole.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
from collections.abc import Callable
from dataclasses import replace
from types import FrameType

from service.ops.ports import bound, check_port_free
from service.settings import Settings

log = logging.getLogger(__name__)

_FORWARDED = (signal.SIGTERM, signal.SIGINT)
_PR_SET_PDEATHSIG = 1


def _term_when_parent_dies(parent: int) -> None:
    """A worker whose parent was killed (SIGKILL cannot be forwarded) gets
    SIGTERM and drains, instead of serving on as an orphan."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _reserve(host: str, port: int) -> socket.socket:
    """Binds (without listening) a SO_REUSEPORT socket, so that port 0 becomes
    one concrete port every worker can share, and no other process takes it
    while the workers start. A socket that does not listen gets no connections.
    A port another process holds is refused, even one that shares it too."""
    check_port_free(host, port)
    return bound(host, port, socket.SO_REUSEPORT)


def run(settings: Settings, count: int, serve: Callable[[Settings], int]) -> int:
    """Forks `count` workers that each run `serve`; returns the exit code.
    Raises StartupError, before forking, when the ports cannot be had."""
    reserved = [_reserve(settings.host, settings.port)]
    shared = replace(settings, port=reserved[0].getsockname()[1])
    if settings.health_port is not None:
        reserved.append(_reserve(settings.host, settings.health_port))
        shared = replace(shared, health_port=reserved[-1].getsockname()[1])

    children: dict[int, int] = {}
    stopping = False

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for pid in children:
            os.kill(pid, signum)

    def forward_reload(signum: int, _frame: FrameType | None) -> None:
        for pid in children:
            os.kill(pid, signum)

    for signum in _FORWARDED:
        signal.signal(signum, forward)
    signal.signal(signal.SIGHUP, forward_reload)
    parent = os.getpid()
    for index in range(count):
        pid = os.fork()
        if pid == 0:
            for signum in _FORWARDED:
                signal.signal(signum, signal.SIG_DFL)
            # Ignored until the worker's server takes it (a reload).
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            _term_when_parent_dies(parent)
            for sock in reserved:
                sock.close()
            os._exit(serve(_for_worker(shared, index)))
        children[pid] = index
    log.info("workers started", extra={"workers": sorted(children), "port": shared.port})

    exit_code = 0
    while children:
        pid, status = os.waitpid(-1, 0)
        index = children.pop(pid)
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            log.error("worker exited", extra={"worker": index, "worker_pid": pid, "code": code})
            exit_code = exit_code or 1
            if not stopping:
                forward(signal.SIGTERM, None)
    for sock in reserved:
        sock.close()
    return exit_code


def _for_worker(settings: Settings, index: int) -> Settings:
    # Metrics are per process: worker i serves them on the base port + i.
    if settings.metrics_port:
        return replace(settings, metrics_port=settings.metrics_port + index)
    return settings
