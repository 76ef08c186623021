"""Whether a listening port is free, and the address gRPC binds for it.

The gRPC acceptors of a process (service/rpc/acceptors.py) and the workers
of `--workers` (service/ops/workers.py) share their port through
SO_REUSEPORT; these keep that sharing to the process's own sockets.
"""

from __future__ import annotations

import socket

from service.errors import StartupError


def check_port_free(host: str, port: int) -> None:
    """Raises StartupError when a socket already holds `port`.

    Sockets that share a port through SO_REUSEPORT would silently share it
    with another process of the same user that does so too (another
    orderstream started by mistake): a socket without the option cannot
    bind next to any of them, so binding one first, and closing it, tells
    a taken port from a free one. It sets SO_REUSEADDR, as gRPC's own
    sockets do, so that the connections of a process that just stopped
    (TIME_WAIT) do not count as holding the port. Port 0 is always free.

    What it leaves open: a process that shares the port too and binds it in
    the moment between this check and the first acceptor's bind. Two
    services started by mistake within that moment on one port is the one
    case that still shares it silently."""
    if port != 0:
        bound(host, port, socket.SO_REUSEADDR).close()


def bound(host: str, port: int, option: int) -> socket.socket:
    """A socket bound, not listening, to `host`:`port` as gRPC would bind
    it, with the socket-level `option` set; StartupError when the port is
    taken."""
    family, _, _, _, address = socket.getaddrinfo(
        host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, option, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock
