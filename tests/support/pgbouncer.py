"""A real PgBouncer (Debian's `pgbouncer`) in transaction mode in front of a
test cluster, verified TLS on both sides, for the suite's second run.

Clients see it under a certificate of its own CA (made with devcluster's
make_certificates), so the service must verify it with that CA while its
direct connection verifies the cluster with the cluster's: each URL's own
TLS settings are exercised. PgBouncer verifies the cluster (verify-full)
and logs in with SCRAM as the app user; clients authenticate to it with
SCRAM against its auth_file.

PgBouncer refuses to run as root; like the cluster, it then runs as the
`postgres` user (devcluster's runuser prefix), so everything it reads is
handed to that user.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import asyncpg

from devcluster.cluster import (
    Certificates,
    Cluster,
    give_to_server_user,
    make_certificates,
    resolve_server_user,
    write_file_atomically,
)

PGBOUNCER = "/usr/sbin/pgbouncer"
_READY_SECONDS = 30.0
_STOP_SECONDS = 30.0
# Server connections per database and user: above what the tests' service
# instances use at once (8 per pool).
POOL_SIZE = 40
_CONFIG = "pgbouncer.ini"
_LOG = "pgbouncer.log"


@dataclass(frozen=True)
class PgBouncer:
    directory: Path
    host: str
    port: int
    ca_cert: Path  # what its clients verify it with
    process: subprocess.Popen[bytes]
    cluster: Cluster

    def dsn(self) -> str:
        """The app user's URL through PgBouncer (no sslmode: verify-full by default)."""
        cluster = self.cluster
        return (
            f"postgresql://{quote(cluster.app_user, safe='')}:"
            f"{quote(cluster.app_password, safe='')}@{self.host}:{self.port}/"
            f"{quote(cluster.database, safe='')}"
        )

    def service_env(self) -> dict[str, str]:
        """The settings a deployment behind this PgBouncer would use: pooled
        calls through it, LISTEN and migrations straight to the cluster,
        each verified with its own CA."""
        cluster = self.cluster
        return {
            "DATABASE_URL": self.dsn(),
            "PGSSLROOTCERT": str(self.ca_cert),
            "ORDERSTREAM_DIRECT_DATABASE_URL": (
                f"{cluster.dsn()}?sslrootcert={quote(str(cluster.certificates.ca_cert))}"
            ),
            "ORDERSTREAM_TRANSACTION_POOLING": "1",
        }

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = (self.directory / _LOG).read_text(errors="replace")
        except OSError as error:
            return f"(no PgBouncer log: {error})"
        return "\n".join(text.splitlines()[-lines:])


def start_pgbouncer(
    directory: Path, cluster: Cluster, *, server_ca: Path | None = None, wait: bool = True
) -> PgBouncer:
    """Starts PgBouncer for `cluster`'s app database and (with `wait`)
    returns once a client can run a query through it. PgBouncer verifies
    the cluster with `server_ca`, the cluster's own CA unless given."""
    if not Path(PGBOUNCER).exists():
        raise RuntimeError(f"{PGBOUNCER} not found: install the Debian package pgbouncer")
    server_user = resolve_server_user()
    directory.mkdir(parents=True, exist_ok=True)
    # Its own 0700 directory, so the key and the passwords stay private.
    give_to_server_user(directory, server_user, mode=0o700)
    certificates = make_certificates(
        directory / "tls", hosts=("127.0.0.1",), common_name="orderstream pgbouncer test CA"
    )
    give_to_server_user(directory / "tls", server_user, mode=0o700)
    for path, mode in (
        (certificates.server_cert, 0o644),
        (certificates.server_key, 0o600),
        (certificates.ca_cert, 0o644),
    ):
        give_to_server_user(path, server_user, mode=mode)
    cluster_ca = directory / "cluster-ca.crt"
    files = {
        cluster_ca: (server_ca or cluster.certificates.ca_cert).read_text(),
        # A plain-text password lets PgBouncer do SCRAM with both its clients
        # and the server.
        directory / "userlist.txt": f'"{cluster.app_user}" "{cluster.app_password}"\n',
    }
    port = _free_port()
    files[directory / _CONFIG] = _config(directory, cluster, port, certificates, cluster_ca)
    for path, content in files.items():
        write_file_atomically(path, content.encode(), mode=0o600)
        give_to_server_user(path, server_user, mode=0o600)

    with open(directory / "stdout.log", "wb") as output:
        process = subprocess.Popen(
            [*server_user.command_prefix, PGBOUNCER, str(directory / _CONFIG)],
            cwd=directory,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    bouncer = PgBouncer(directory, "127.0.0.1", port, certificates.ca_cert, process, cluster)
    if not wait:
        return bouncer
    try:
        asyncio.run(_wait_until_ready(bouncer))
    except BaseException:
        stop_pgbouncer(bouncer)
        raise
    return bouncer


def stop_pgbouncer(bouncer: PgBouncer) -> None:
    """SIGTERM: PgBouncer's immediate shutdown (runuser passes it on)."""
    if bouncer.process.poll() is None:
        bouncer.process.send_signal(signal.SIGTERM)
    try:
        bouncer.process.wait(timeout=_STOP_SECONDS)
    except subprocess.TimeoutExpired:
        bouncer.process.kill()
        bouncer.process.wait()
        raise RuntimeError(
            f"PgBouncer did not stop within {_STOP_SECONDS:g}s:\n{bouncer.log_tail()}"
        ) from None


def _config(
    directory: Path, cluster: Cluster, port: int, certificates: Certificates, cluster_ca: Path
) -> str:
    settings = {
        "listen_addr": "127.0.0.1",
        "listen_port": str(port),
        # TCP and TLS only, like the cluster.
        "unix_socket_dir": "",
        "logfile": str(directory / _LOG),
        "pool_mode": "transaction",
        "auth_type": "scram-sha-256",
        "auth_file": str(directory / "userlist.txt"),
        "max_client_conn": "400",
        "default_pool_size": str(POOL_SIZE),
        "client_tls_sslmode": "require",
        "client_tls_cert_file": str(certificates.server_cert),
        "client_tls_key_file": str(certificates.server_key),
        "server_tls_sslmode": "verify-full",
        "server_tls_ca_file": str(cluster_ca),
    }
    lines = [
        "[databases]",
        f"{cluster.database} = host={cluster.host} port={cluster.port} dbname={cluster.database}",
        "",
        "[pgbouncer]",
        *(f"{key} = {value}" for key, value in settings.items()),
    ]
    return "\n".join(lines) + "\n"


async def _wait_until_ready(bouncer: PgBouncer) -> None:
    """Nothing announces readiness: connect until a query goes through (or
    the process is gone)."""
    deadline = time.monotonic() + _READY_SECONDS
    while True:
        if bouncer.process.poll() is not None:
            raise RuntimeError(
                f"PgBouncer exited with {bouncer.process.returncode}:\n{bouncer.log_tail()}"
            )
        try:
            conn = await asyncpg.connect(
                bouncer.dsn(),
                ssl=ssl.create_default_context(cafile=str(bouncer.ca_cert)),
                statement_cache_size=0,
                timeout=5,
            )
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as error:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"PgBouncer not ready within {_READY_SECONDS:g}s ({error!r}):\n"
                    f"{bouncer.log_tail()}"
                ) from None
            await asyncio.sleep(0.05)
            continue
        try:
            await conn.fetchval("SELECT 1")
        finally:
            await conn.close()
        return


def _free_port() -> int:
    """Racy by nature, like devcluster's: PgBouncer fails to start if it is taken."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
