"""Server credentials for the gRPC listener, from certificate files that may
be rotated while it serves.

With a client CA the listener demands a certificate that chains to it
(mTLS); a caller without one, or with one from another CA, fails the
handshake before any RPC runs.

The certificate, key and client CA are a `WatchedFiles`
(service/ops/reloading.py): gRPC asks a fetcher for the configuration at
each new handshake, and it answers with the new one once after a reload.
New connections get the new certificate; connections already open, and
their calls, keep the session they negotiated. A pair that does not load
together (a key of another certificate, half-written files) is refused
before gRPC sees it, so the one in force stays.
"""

from __future__ import annotations

import contextlib
import os
import ssl
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc

from service.errors import StartupError
from service.ops.reloading import WatchedFiles
from service.settings import ListenerTls


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise StartupError(f"cannot read the listener's {what} {path}: {exc.strerror}") from None


def watched_certificate(tls: ListenerTls) -> WatchedFiles[grpc.ServerCertificateConfiguration]:
    """The listener's certificate configuration, read now (bad files stop
    startup) and again whenever the files change."""

    def read() -> Sequence[bytes]:
        files = [_read(tls.key, "private key"), _read(tls.cert, "certificate")]
        if tls.client_ca is not None:
            files.append(_read(tls.client_ca, "client CA"))
        return files

    def parse(contents: Sequence[bytes]) -> grpc.ServerCertificateConfiguration:
        key, cert, *client_ca = contents
        _check(tls, key, cert, client_ca[0] if client_ca else None)
        return grpc.ssl_server_certificate_configuration(
            [(key, cert)], root_certificates=client_ca[0] if client_ca else None
        )

    return WatchedFiles("listener certificate", read, parse)


def server_credentials(
    tls: ListenerTls, certificate: WatchedFiles[grpc.ServerCertificateConfiguration]
) -> grpc.ServerCredentials:
    served = certificate.current

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        # Called by gRPC's threads at every handshake: None keeps what it has.
        nonlocal served
        current = certificate.current
        if current is served:
            return None
        served = current
        return current

    return grpc.dynamic_ssl_server_credentials(
        served, fetch, require_client_authentication=tls.client_ca is not None
    )


def _check(tls: ListenerTls, key: bytes, cert: bytes, client_ca: bytes | None) -> None:
    """Refuses what gRPC would fail every handshake with, naming the files."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        with _in_memory(cert) as cert_path, _in_memory(key) as key_path:
            # A password callback, so an encrypted key fails instead of
            # prompting on a terminal; gRPC takes no encrypted keys.
            context.load_cert_chain(cert_path, key_path, password=lambda: b"")
    except ssl.SSLError as exc:
        raise StartupError(
            f"the listener's certificate {tls.cert} and private key {tls.key} "
            f"do not load together: {exc.reason or exc}"
        ) from None
    if client_ca is not None:
        try:
            context.load_verify_locations(cadata=client_ca.decode("ascii", errors="replace"))
        except ssl.SSLError as exc:
            raise StartupError(
                f"the listener's client CA {tls.client_ca} holds no usable certificate: "
                f"{exc.reason or exc}"
            ) from None


@contextlib.contextmanager
def _in_memory(content: bytes) -> Iterator[str]:
    """A path to `content` that exists only in memory: ssl loads
    certificates and keys from paths alone, and the key must not be copied
    to disk (and the files read may since have changed again)."""
    fd = os.memfd_create("orderstream-listener", os.MFD_CLOEXEC)
    try:
        with open(fd, "wb", closefd=False) as file:
            file.write(content)
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)
