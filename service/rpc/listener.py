"""Server credentials for the gRPC listener, from certificate files.

With a client CA the listener demands a certificate that chains to it
(mTLS); a caller without one, or with one from another CA, fails the
handshake before any RPC runs.
"""

from __future__ import annotations

from pathlib import Path

import grpc

from service.errors import StartupError
from service.settings import ListenerTls


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise StartupError(f"cannot read the listener's {what} {path}: {exc.strerror}") from None


def server_credentials(tls: ListenerTls) -> grpc.ServerCredentials:
    key_pair = (_read(tls.key, "private key"), _read(tls.cert, "certificate"))
    if tls.client_ca is None:
        return grpc.ssl_server_credentials([key_pair])
    return grpc.ssl_server_credentials(
        [key_pair],
        root_certificates=_read(tls.client_ca, "client CA"),
        require_client_auth=True,
    )
