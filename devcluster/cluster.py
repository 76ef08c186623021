"""A local PostgreSQL cluster with its own CA, reachable only over verified TLS.

Used by the test suite (throwaway clusters in temporary directories) and by
`make run` (a persistent cluster in a fixed directory):

    python -m devcluster.cluster up DIR     # prints `export ...` lines
    python -m devcluster.cluster down DIR

Layout of a base directory:

    credentials.json   passwords and the port, 0600 (needed to restart)
    tls/               CA certificate, server certificate and key (client side)
    data/              the PostgreSQL data directory, owned by the server user
    data/server.log    server log
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import datetime
import fcntl
import ipaddress
import json
import os
import pwd
import re
import secrets
import shlex
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
from collections.abc import Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import asyncpg
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_T = TypeVar("_T")

_DATABASE = "orderstream"
_APP_USER = "orderstream"
_ADMIN_USER = "postgres"
_HOST = "localhost"
# Not on the server certificate: tests connect here to provoke a host-name mismatch.
_MISMATCH_ADDRESS = "127.0.0.2"
_SERVER_OS_USER = "postgres"

_CA_VALIDITY = datetime.timedelta(days=3650)
# Same as the CA: a persistent dev cluster reuses its certificates indefinitely.
_SERVER_VALIDITY = datetime.timedelta(days=3650)
# Tolerates small clock differences between the host and containers.
_BACKDATE = datetime.timedelta(minutes=5)

_PG_CTL_WAIT_SECONDS = 60
_SUBPROCESS_TIMEOUT_SECONDS = 120
_LOG_TAIL_LINES = 40

_CREDENTIALS_FILE = "credentials.json"
_LOCK_FILE = ".devcluster.lock"
_TLS_DIR = "tls"
_DATA_DIR = "data"
_LOG_FILE = "server.log"
_SETTINGS_FILE = "devcluster.conf"
# A standby's copies of the primary's CA and of the password its WAL receiver
# logs in with (a libpq passfile, so the password is neither on a command
# line nor in postgresql.auto.conf).
_PRIMARY_CA_FILE = "primary-ca.crt"
_PRIMARY_PASSFILE = "primary.pgpass"


# --------------------------------------------------------------------------
# Certificates
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Certificates:
    ca_cert: Path
    server_cert: Path
    server_key: Path


def make_certificates(
    directory: Path,
    *,
    hosts: Sequence[str] = ("localhost", "127.0.0.1"),
    common_name: str = "orderstream dev CA",
) -> Certificates:
    """Creates a fresh CA (EC P-256, ~10y validity) and a server certificate
    signed by it whose SANs are `hosts` (DNS names and IP addresses as
    appropriate). Idempotent: if all three files already exist, returns them."""
    directory = Path(directory)
    certificates = Certificates(
        ca_cert=directory / "ca.crt",
        server_cert=directory / "server.crt",
        server_key=directory / "server.key",
    )
    if all(path.exists() for path in _certificate_paths(certificates)):
        return certificates
    if not hosts:
        raise ValueError("make_certificates: at least one host is required")

    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _build_ca_certificate(ca_key, common_name)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = _build_server_certificate(server_key, ca_key, ca_cert, hosts)

    # The CA key is deliberately never written: nothing else is signed with it,
    # so there is no long-lived signing secret lying around in the dev tree.
    write_file_atomically(certificates.server_key, _private_key_pem(server_key), mode=0o600)
    write_file_atomically(certificates.server_cert, _certificate_pem(server_cert), mode=0o644)
    # Written last so that a half-finished run is never mistaken for a complete one.
    write_file_atomically(certificates.ca_cert, _certificate_pem(ca_cert), mode=0o644)
    return certificates


def make_ca_only(directory: Path, common_name: str) -> Path:
    """Creates an unrelated CA certificate file (for 'wrong CA' tests); returns its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    path = directory / f"{_slug(common_name)}-ca.crt"
    write_file_atomically(
        path, _certificate_pem(_build_ca_certificate(ca_key, common_name)), mode=0o644
    )
    return path


def _certificate_paths(certificates: Certificates) -> tuple[Path, Path, Path]:
    return (certificates.ca_cert, certificates.server_cert, certificates.server_key)


def _validity_window(validity: datetime.timedelta) -> tuple[datetime.datetime, datetime.datetime]:
    now = datetime.datetime.now(datetime.UTC)
    return now - _BACKDATE, now + validity


def _build_ca_certificate(key: ec.EllipticCurvePrivateKey, common_name: str) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    return _certificate_builder(name, name, key.public_key(), _CA_VALIDITY, ca=True).sign(
        key, hashes.SHA256()
    )


def _build_server_certificate(
    key: ec.EllipticCurvePrivateKey,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    hosts: Sequence[str],
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
    return (
        _certificate_builder(name, ca_cert.subject, key.public_key(), _SERVER_VALIDITY, ca=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName(_subject_alternative_names(hosts)), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )


def _certificate_builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    validity: datetime.timedelta,
    *,
    ca: bool,
) -> x509.CertificateBuilder:
    """What the CA and the server certificate share; `ca` decides whether
    the key signs certificates (the CA) or TLS handshakes (the server)."""
    not_before, not_after = _validity_window(validity)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=not ca,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def _subject_alternative_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _certificate_pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "ca"


def write_file_atomically(path: Path, content: bytes, *, mode: int) -> None:
    """Writes atomically with `mode` from the start, so secrets are never briefly world-readable."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(content)
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


# --------------------------------------------------------------------------
# Cluster
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Cluster:
    base_dir: Path
    data_dir: Path
    host: str
    port: int
    certificates: Certificates
    database: str
    app_user: str
    app_password: str = field(repr=False)
    admin_user: str
    admin_password: str = field(repr=False)

    def dsn(
        self, *, admin: bool = False, host: str | None = None, database: str | None = None
    ) -> str:
        """postgresql://user:password@host:port/db - deliberately without sslmode:
        clients configure verification themselves from the CA file."""
        user, password = (
            (self.admin_user, self.admin_password) if admin else (self.app_user, self.app_password)
        )
        netloc_host = host or self.host
        if ":" in netloc_host:
            netloc_host = f"[{netloc_host}]"
        return (
            f"postgresql://{quote(user, safe='')}:{quote(password, safe='')}"
            f"@{netloc_host}:{self.port}/{quote(database or self.database, safe='')}"
        )

    def service_env(self) -> dict[str, str]:
        return {"DATABASE_URL": self.dsn(), "PGSSLROOTCERT": str(self.certificates.ca_cert)}


@dataclass(frozen=True)
class _ClusterState:
    """What must survive between runs of a persistent cluster."""

    admin_password: str
    app_password: str
    port: int


@dataclass(frozen=True)
class ServerUser:
    """The OS user the server runs as, and how to run commands as it."""

    uid: int
    gid: int
    group_ids: frozenset[int]
    command_prefix: tuple[str, ...]

    @property
    def is_other_user(self) -> bool:
        return self.uid != os.geteuid()


def start_cluster(base_dir: Path, *, port: int | None = None, durable: bool = True) -> Cluster:
    """Starts (creating on first use) a cluster under base_dir. If base_dir
    already holds an initialised cluster from an earlier call (persistent dev
    use), reuse it: same passwords (read from a 0600 file inside base_dir),
    same certs; restart it if not running, on the recorded port unless `port`
    is given. port=None on first use picks a free TCP port.

    durable=False turns off fsync, synchronous_commit and full_page_writes
    (fast, but the data does not survive an OS crash) - meant for tests."""
    base_dir = Path(base_dir).absolute()
    server_user = resolve_server_user()
    _prepare_base_dir(base_dir, server_user)
    with _base_dir_lock(base_dir):
        state = _load_or_create_state(base_dir, port)
        certificates = make_certificates(base_dir / _TLS_DIR)
        data_dir = base_dir / _DATA_DIR
        if not (data_dir / "PG_VERSION").exists():
            _initialise_data_dir(data_dir, state, server_user)
        _enforce_access_configuration(data_dir, server_user)
        _install_server_certificates(data_dir, certificates, server_user)

        if port is not None and port != state.port:
            state = _ClusterState(state.admin_password, state.app_password, port)
        _start_or_reload_server(data_dir, state.port, durable, server_user)
        # Recorded only once the server runs there, so a failed attempt on
        # another port does not change where the next plain start goes.
        _save_state(base_dir, state)

        cluster = Cluster(
            base_dir=base_dir,
            data_dir=data_dir,
            host=_HOST,
            port=state.port,
            certificates=certificates,
            database=_DATABASE,
            app_user=_APP_USER,
            app_password=state.app_password,
            admin_user=_ADMIN_USER,
            admin_password=state.admin_password,
        )
        try:
            _run_coroutine(_ensure_app_role_and_database(cluster))
        except (OSError, asyncpg.PostgresError) as error:
            raise RuntimeError(
                f"start cluster: setting up role and database over TLS failed: {error!r}\n"
                f"--- tail of {data_dir / _LOG_FILE} ---\n{_server_log_tail(data_dir)}"
            ) from error
        return cluster


def _start_or_reload_server(
    data_dir: Path,
    port: int,
    durable: bool,
    server_user: ServerUser,
    extra_settings: Mapping[str, str] | None = None,
) -> None:
    running_port = _running_port(data_dir, server_user)
    if running_port != port:
        # Before touching anything, so a clash leaves a running server as it was.
        _ensure_port_is_free(port)
    _write_server_settings(data_dir, port, durable, server_user, extra_settings)
    if running_port == port:
        # Already up where wanted: a reload picks up a changed `durable` setting.
        _pg_ctl(data_dir, server_user, "reload")
        return
    if running_port is not None:
        _pg_ctl_stop(data_dir, server_user, mode="fast")
    _pg_ctl_start(data_dir, server_user)


def stop_cluster(cluster_or_base_dir: Cluster | Path | str, *, mode: str = "fast") -> None:
    """pg_ctl stop -m fast|immediate; no error if not running (or never created)."""
    if mode not in ("smart", "fast", "immediate"):
        raise ValueError(f"stop cluster: unknown shutdown mode {mode!r}")
    if isinstance(cluster_or_base_dir, Cluster):
        base_dir = cluster_or_base_dir.base_dir
    else:
        base_dir = Path(cluster_or_base_dir).absolute()
    data_dir = base_dir / _DATA_DIR
    if not (data_dir / "PG_VERSION").exists():
        return
    server_user = resolve_server_user()
    with _base_dir_lock(base_dir):
        if _running_port(data_dir, server_user) is not None:
            _pg_ctl_stop(data_dir, server_user, mode=mode)


def promote_standby(standby: Cluster) -> None:
    """`pg_ctl promote --wait`: the standby ends recovery and takes writes,
    as an operator's failover tool does underneath."""
    server_user = resolve_server_user()
    with _base_dir_lock(standby.base_dir):
        _pg_ctl(
            standby.data_dir, server_user, "promote", "--wait", f"--timeout={_PG_CTL_WAIT_SECONDS}"
        )


def start_standby(
    primary: Cluster,
    base_dir: Path,
    *,
    durable: bool = True,
    settings: Mapping[str, str] | None = None,
) -> Cluster:
    """Starts a hot standby of `primary` under base_dir (creating it on first
    use), streaming WAL from the primary over verified TLS.

    It is made by `pg_basebackup --write-recovery-conf` as the primary's
    superuser (the only role pg_hba's `hostssl replication` lines let
    replicate), with sslmode=verify-full against the primary's CA. It runs
    on a port of its own with the same server certificate (which names
    localhost and 127.0.0.1) and the same roles and passwords, read-only.
    `settings` are extra server settings (e.g. log_statement)."""
    base_dir = Path(base_dir).absolute()
    server_user = resolve_server_user()
    _prepare_base_dir(base_dir, server_user)
    with _base_dir_lock(base_dir):
        data_dir = base_dir / _DATA_DIR
        if (base_dir / _CREDENTIALS_FILE).exists():
            state = _load_or_create_state(base_dir, None)
        else:
            state = _ClusterState(primary.admin_password, primary.app_password, _free_port())
        if not (data_dir / "PG_VERSION").exists():
            _base_backup(primary, base_dir, data_dir, server_user, durable=durable)
        _enforce_access_configuration(data_dir, server_user)
        _install_server_certificates(data_dir, primary.certificates, server_user)
        _start_or_reload_server(data_dir, state.port, durable, server_user, settings)
        _save_state(base_dir, state)
    return Cluster(
        base_dir=base_dir,
        data_dir=data_dir,
        host=_HOST,
        port=state.port,
        certificates=primary.certificates,
        database=primary.database,
        app_user=primary.app_user,
        app_password=state.app_password,
        admin_user=primary.admin_user,
        admin_password=state.admin_password,
    )


def _base_backup(
    primary: Cluster, base_dir: Path, data_dir: Path, server_user: ServerUser, *, durable: bool
) -> None:
    ca_file = base_dir / _PRIMARY_CA_FILE
    _write_server_file(ca_file, primary.certificates.ca_cert.read_bytes(), server_user, mode=0o644)
    passfile = base_dir / _PRIMARY_PASSFILE
    entry = f"*:*:*:{_pgpass_field(primary.admin_user)}:{_pgpass_field(primary.admin_password)}"
    _write_server_file(passfile, entry.encode() + b"\n", server_user, mode=0o600)
    data_dir.mkdir(mode=0o700, exist_ok=True)
    give_to_server_user(data_dir, server_user, mode=0o700)
    conninfo = " ".join(
        f"{key}={_conninfo_value(value)}"
        for key, value in (
            ("host", primary.host),
            ("port", str(primary.port)),
            ("user", primary.admin_user),
            ("passfile", str(passfile)),
            ("sslmode", "verify-full"),
            ("sslrootcert", str(ca_file)),
            ("application_name", base_dir.name),
        )
    )
    result = _run_as_server_user(
        server_user,
        [
            _pg_binary("pg_basebackup"),
            "--pgdata",
            str(data_dir),
            "--dbname",
            conninfo,
            "--write-recovery-conf",
            "--wal-method=stream",
            # Otherwise it waits for the primary's next scheduled checkpoint.
            "--checkpoint=fast",
            # Like fsync=off on a cluster that need not survive a crash.
            *(() if durable else ("--no-sync",)),
        ],
        cwd=base_dir,
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"pg_basebackup failed (exit {result.returncode}) into {data_dir}:\n"
            f"{_tail(result.stdout + result.stderr)}"
        )
    # The copy carries the primary's pid file and log; neither belongs here.
    (data_dir / "postmaster.pid").unlink(missing_ok=True)
    (data_dir / _LOG_FILE).unlink(missing_ok=True)


def _conninfo_value(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _pgpass_field(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:")


async def create_database(cluster: Cluster, name: str) -> str:
    """Creates a new empty database owned by app_user (via an admin connection
    over verified TLS); returns its name."""
    connection = await _connect_admin(cluster)
    try:
        # template0 rather than template1: concurrent CREATE DATABASE calls fail
        # when anyone else happens to be connected to the template.
        await connection.execute(
            f"CREATE DATABASE {_quote_identifier(name)} "
            f"OWNER {_quote_identifier(cluster.app_user)} TEMPLATE template0 ENCODING 'UTF8'"
        )
    finally:
        await connection.close()
    return name


# --------------------------------------------------------------------------
# Base directory, state and permissions
# --------------------------------------------------------------------------


def resolve_server_user() -> ServerUser:
    """This process's user, or under root the `postgres` user run via runuser
    (for the cluster and anything else that refuses root, such as PgBouncer)."""
    if os.geteuid() != 0:
        return ServerUser(
            uid=os.geteuid(),
            gid=os.getegid(),
            group_ids=frozenset(os.getgroups()) | {os.getegid()},
            command_prefix=(),
        )
    # PostgreSQL refuses to run as root, so the server runs as the `postgres` user.
    try:
        entry = pwd.getpwnam(_SERVER_OS_USER)
    except KeyError:
        raise RuntimeError(
            f"start cluster: running as root needs an unprivileged '{_SERVER_OS_USER}' user "
            "to run the server as, and there is none"
        ) from None
    runuser = shutil.which("runuser")
    if runuser is None:
        raise RuntimeError("start cluster: running as root needs `runuser` to drop privileges")
    return ServerUser(
        uid=entry.pw_uid,
        gid=entry.pw_gid,
        group_ids=frozenset(os.getgrouplist(entry.pw_name, entry.pw_gid)),
        command_prefix=(runuser, "-u", entry.pw_name, "--"),
    )


def _prepare_base_dir(base_dir: Path, server_user: ServerUser) -> None:
    if server_user.is_other_user:
        # Checked before creating anything so a bad location leaves no debris.
        blocked = _first_untraversable_ancestor(base_dir, server_user)
        if blocked is not None:
            raise RuntimeError(
                f"start cluster: the server runs as user '{_SERVER_OS_USER}', which cannot "
                f"enter {blocked}; choose a base directory it can reach (e.g. under /tmp) "
                f"instead of {base_dir}"
            )
    base_dir.mkdir(parents=True, exist_ok=True)
    if server_user.is_other_user and not _can_traverse(base_dir, server_user):
        # Typically a root-owned 0700 tempfile.mkdtemp() directory. Search
        # permission alone lets the server reach data/ without being able to
        # list or read anything else in here (credentials.json stays 0600).
        os.chmod(base_dir, stat.S_IMODE(base_dir.stat().st_mode) | stat.S_IXOTH)


def _first_untraversable_ancestor(path: Path, server_user: ServerUser) -> Path | None:
    for ancestor in reversed(path.parents):
        if not ancestor.exists():
            return None
        if not _can_traverse(ancestor, server_user):
            return ancestor
    return None


def _can_traverse(directory: Path, server_user: ServerUser) -> bool:
    status = directory.stat()
    if status.st_uid == server_user.uid:
        return bool(status.st_mode & stat.S_IXUSR)
    if status.st_gid in server_user.group_ids:
        return bool(status.st_mode & stat.S_IXGRP)
    return bool(status.st_mode & stat.S_IXOTH)


@contextlib.contextmanager
def _base_dir_lock(base_dir: Path) -> Iterator[None]:
    """Serialises start/stop so `make run` and a test run sharing a directory cannot interleave."""
    with open(base_dir / _LOCK_FILE, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _load_or_create_state(base_dir: Path, port: int | None) -> _ClusterState:
    path = base_dir / _CREDENTIALS_FILE
    if path.exists():
        try:
            raw = json.loads(path.read_text())
            return _ClusterState(
                admin_password=str(raw["admin_password"]),
                app_password=str(raw["app_password"]),
                port=int(raw["port"]),
            )
        except (ValueError, KeyError, TypeError) as error:
            raise RuntimeError(f"start cluster: cannot read {path}: {error}") from error
    if (base_dir / _DATA_DIR / "PG_VERSION").exists():
        raise RuntimeError(
            f"start cluster: {base_dir / _DATA_DIR} exists but {path} is missing, so the "
            "passwords are unknown; delete the directory to start afresh"
        )
    state = _ClusterState(
        admin_password=secrets.token_urlsafe(24),
        app_password=secrets.token_urlsafe(24),
        port=port if port is not None else _free_port(),
    )
    # Saved before initdb: if initdb fails, a retry reuses the same passwords.
    _save_state(base_dir, state)
    return state


def _save_state(base_dir: Path, state: _ClusterState) -> None:
    content = json.dumps(
        {
            "admin_password": state.admin_password,
            "app_password": state.app_password,
            "port": state.port,
        },
        indent=2,
    )
    write_file_atomically(base_dir / _CREDENTIALS_FILE, content.encode() + b"\n", mode=0o600)


def _free_port() -> int:
    """A port that is free on both addresses the server listens on.

    Racy by nature: someone may take it before the server does, which the
    check right before starting the server then reports."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
            candidate = int(probe.getsockname()[1])
            if _port_is_free(_MISMATCH_ADDRESS, candidate):
                return candidate
    raise RuntimeError("start cluster: could not find a free TCP port")


def _ensure_port_is_free(port: int) -> None:
    """PostgreSQL starts as long as it can bind *one* listen address, so a port
    taken on 127.0.0.1 would leave clients of "localhost" talking to a stranger."""
    for address in ("127.0.0.1", _MISMATCH_ADDRESS):
        if not _port_is_free(address, port):
            raise RuntimeError(
                f"start cluster: port {port} is already in use on {address}; "
                "pass another port (--port for the CLI)"
            )


def _port_is_free(address: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # As the server does: only a live listener, not TIME_WAIT leftovers
        # from the previous run, should count as "in use".
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((address, port))
        except OSError:
            return False
    return True


def give_to_server_user(path: Path, server_user: ServerUser, *, mode: int) -> None:
    """Hands `path` to the server's OS user (when that is another user), with `mode`."""
    if server_user.is_other_user:
        os.chown(path, server_user.uid, server_user.gid)
    os.chmod(path, mode)


# --------------------------------------------------------------------------
# Server setup
# --------------------------------------------------------------------------


def _initialise_data_dir(data_dir: Path, state: _ClusterState, server_user: ServerUser) -> None:
    # Created here because the server user cannot create entries in base_dir.
    data_dir.mkdir(mode=0o700, exist_ok=True)
    give_to_server_user(data_dir, server_user, mode=0o700)

    password_file = data_dir.parent / ".initdb-password"
    _write_server_file(
        password_file, state.admin_password.encode() + b"\n", server_user, mode=0o600
    )
    try:
        result = _run_as_server_user(
            server_user,
            [
                _pg_binary("initdb"),
                "--pgdata",
                str(data_dir),
                "--username",
                _ADMIN_USER,
                f"--pwfile={password_file}",
                "--auth=scram-sha-256",
                "--encoding=UTF8",
                f"--locale={_initdb_locale()}",
                "--no-sync",
                "--no-instructions",
            ],
            cwd=data_dir.parent,
        )
    finally:
        password_file.unlink(missing_ok=True)
    if result.returncode != 0:
        raise RuntimeError(
            f"initdb failed (exit {result.returncode}) for {data_dir}:\n"
            f"{_tail(result.stdout + result.stderr)}"
        )


def _enforce_access_configuration(data_dir: Path, server_user: ServerUser) -> None:
    """Applied on every start, not just after initdb, so that neither an
    interrupted first start nor a hand-edited pg_hba.conf can leave a cluster
    that accepts plain-text connections."""
    _write_server_file(data_dir / "pg_hba.conf", _pg_hba_conf().encode(), server_user, mode=0o600)
    main_config = data_dir / "postgresql.conf"
    include_line = f"include '{_SETTINGS_FILE}'"
    if include_line not in main_config.read_text().splitlines():
        with open(main_config, "a") as handle:
            # The settings live in their own file so every start can rewrite
            # them (port and durability may change between runs).
            handle.write(f"\n{include_line}\n")


def _pg_hba_conf() -> str:
    # Nothing but TLS with SCRAM: no `local` (there is no socket) and no plain `host`.
    return (
        "# TYPE  DATABASE  USER  ADDRESS       METHOD\n"
        "hostssl all       all   127.0.0.1/32  scram-sha-256\n"
        "hostssl all       all   ::1/128       scram-sha-256\n"
        f"hostssl all       all   {_MISMATCH_ADDRESS}/32  scram-sha-256\n"
        # Streaming replication for test standbys (start_standby); only roles
        # with REPLICATION (here: the superuser) may use these lines.
        "hostssl replication all 127.0.0.1/32  scram-sha-256\n"
        "hostssl replication all ::1/128       scram-sha-256\n"
    )


def _install_server_certificates(
    data_dir: Path, certificates: Certificates, server_user: ServerUser
) -> None:
    """Copies cert and key into the data directory, owned by the server user:
    the server refuses a key that is not 0600 and owned by itself (or root)."""
    for source, name, mode in (
        (certificates.server_cert, "server.crt", 0o644),
        (certificates.server_key, "server.key", 0o600),
    ):
        target = data_dir / name
        _write_server_file(target, source.read_bytes(), server_user, mode=mode)


def _write_server_settings(
    data_dir: Path,
    port: int,
    durable: bool,
    server_user: ServerUser,
    extra_settings: Mapping[str, str] | None = None,
) -> None:
    settings = {
        "listen_addresses": f"localhost,{_MISMATCH_ADDRESS}",
        "port": str(port),
        # TCP+TLS only: every connection goes through pg_hba's hostssl lines.
        "unix_socket_directories": "",
        "ssl": "on",
        "ssl_cert_file": "server.crt",
        "ssl_key_file": "server.key",
        "password_encryption": "scram-sha-256",
        "max_connections": "200",
        "logging_collector": "off",
        "fsync": "on" if durable else "off",
        "synchronous_commit": "on" if durable else "off",
        "full_page_writes": "on" if durable else "off",
        **(extra_settings or {}),
    }
    lines = ["# Written by devcluster/cluster.py on every start; edits are lost.\n"]
    lines += [f"{key} = '{value}'\n" for key, value in settings.items()]
    _write_server_file(data_dir / _SETTINGS_FILE, "".join(lines).encode(), server_user, mode=0o600)


def _write_server_file(path: Path, content: bytes, server_user: ServerUser, *, mode: int) -> None:
    """Writes `path` atomically, owned by the server's OS user, with `mode`."""
    write_file_atomically(path, content, mode=mode)
    give_to_server_user(path, server_user, mode=mode)


def _initdb_locale() -> str:
    """C.UTF-8 where the C library has it (proper UTF-8 ctype), otherwise plain C."""
    try:
        result = subprocess.run(["locale", "-a"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "C"
    available = {line.strip().lower() for line in result.stdout.splitlines()}
    return "C.UTF-8" if available & {"c.utf8", "c.utf-8"} else "C"


# --------------------------------------------------------------------------
# pg_ctl and friends
# --------------------------------------------------------------------------


def _pg_ctl_start(data_dir: Path, server_user: ServerUser) -> None:
    result = _pg_ctl(
        data_dir,
        server_user,
        "start",
        "--wait",
        f"--timeout={_PG_CTL_WAIT_SECONDS}",
        f"--log={data_dir / _LOG_FILE}",
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"pg_ctl start failed (exit {result.returncode}) for {data_dir}:\n"
            f"{_tail(result.stdout + result.stderr)}\n"
            f"--- tail of {data_dir / _LOG_FILE} ---\n{_server_log_tail(data_dir)}"
        )


def _pg_ctl_stop(data_dir: Path, server_user: ServerUser, *, mode: str) -> None:
    result = _pg_ctl(
        data_dir,
        server_user,
        "stop",
        f"--mode={mode}",
        "--wait",
        f"--timeout={_PG_CTL_WAIT_SECONDS}",
        check=False,
    )
    # A non-zero exit from a server that is gone anyway (it stopped between
    # our status check and the stop) is not a failure.
    if result.returncode != 0 and _running_port(data_dir, server_user) is not None:
        raise RuntimeError(
            f"pg_ctl stop failed (exit {result.returncode}) for {data_dir}:\n"
            f"{_tail(result.stdout + result.stderr)}\n"
            f"--- tail of {data_dir / _LOG_FILE} ---\n{_server_log_tail(data_dir)}"
        )


def _running_port(data_dir: Path, server_user: ServerUser) -> int | None:
    """The port of the server running on data_dir, or None if none is running."""
    result = _pg_ctl(data_dir, server_user, "status", check=False)
    # pg_ctl status: 0 running, 3 not running, 4 no accessible data directory.
    if result.returncode != 0:
        return None
    try:
        # postmaster.pid: pid, data dir, start time, port, ...
        return int((data_dir / "postmaster.pid").read_text().splitlines()[3])
    except (OSError, IndexError, ValueError):
        return None


def _pg_ctl(
    data_dir: Path, server_user: ServerUser, action: str, *options: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    result = _run_as_server_user(
        server_user,
        [_pg_binary("pg_ctl"), action, "--pgdata", str(data_dir), *options],
        cwd=data_dir.parent,
    )
    if check and result.returncode != 0:
        raise RuntimeError(
            f"pg_ctl {action} failed (exit {result.returncode}) for {data_dir}:\n"
            f"{_tail(result.stdout + result.stderr)}\n"
            f"--- tail of {data_dir / _LOG_FILE} ---\n{_server_log_tail(data_dir)}"
        )
    return result


def _run_as_server_user(
    server_user: ServerUser, command: list[str], *, cwd: Path
) -> subprocess.CompletedProcess[str]:
    # PG* variables from the developer's shell (PGDATA, PGPORT, ...) would
    # silently override what we configure, so the tools never see them.
    environment = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    # pg_ctl start leaves the server running in the background; its output
    # goes to the log file, so the pipes here close when pg_ctl exits.
    return subprocess.run(
        [*server_user.command_prefix, *command],
        cwd=cwd,
        env=environment,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=_SUBPROCESS_TIMEOUT_SECONDS,
    )


def _pg_binary(name: str) -> str:
    candidate = _postgres_bin_dir() / name
    if not candidate.exists():
        raise RuntimeError(f"start cluster: {candidate} not found")
    return str(candidate)


def _postgres_bin_dir() -> Path:
    """ORDERSTREAM_PG_BINDIR, else pg_ctl on PATH, else the newest Debian-style install."""
    configured = os.environ.get("ORDERSTREAM_PG_BINDIR")
    if configured:
        return Path(configured)
    on_path = shutil.which("pg_ctl")
    if on_path:
        return Path(on_path).resolve().parent
    installs = [
        path for path in Path("/usr/lib/postgresql").glob("*/bin") if (path / "pg_ctl").exists()
    ]
    if not installs:
        raise RuntimeError(
            "start cluster: no PostgreSQL server binaries found; "
            "install them or set ORDERSTREAM_PG_BINDIR"
        )
    return max(installs, key=_version_key)


def _version_key(bin_dir: Path) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", bin_dir.parent.name)) or (0,)


def _server_log_tail(data_dir: Path) -> str:
    try:
        return _tail((data_dir / _LOG_FILE).read_text(errors="replace"))
    except OSError as error:
        return f"(no server log: {error})"


def _tail(text: str) -> str:
    return "\n".join(text.strip().splitlines()[-_LOG_TAIL_LINES:])


# --------------------------------------------------------------------------
# SQL over verified TLS
# --------------------------------------------------------------------------


def _verified_tls_context(ca_cert: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_cert))
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    return context


async def _connect_admin(cluster: Cluster, database: str = "postgres") -> asyncpg.Connection:
    return await asyncpg.connect(
        host=cluster.host,
        port=cluster.port,
        user=cluster.admin_user,
        password=cluster.admin_password,
        database=database,
        ssl=_verified_tls_context(cluster.certificates.ca_cert),
        timeout=30,
    )


async def _ensure_app_role_and_database(cluster: Cluster) -> None:
    """Idempotent, so it also repairs a cluster whose first start was interrupted."""
    connection = await _connect_admin(cluster)
    try:
        role = _quote_identifier(cluster.app_user)
        role_exists = await connection.fetchval(
            "SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)", cluster.app_user
        )
        verb = "ALTER" if role_exists else "CREATE"
        # Utility statements take no bind parameters; the password is a
        # token_urlsafe string, quoted as a literal all the same.
        await connection.execute(
            f"{verb} ROLE {role} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE "
            f"PASSWORD {_quote_literal(cluster.app_password)}"
        )
        database_exists = await connection.fetchval(
            "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)", cluster.database
        )
        if not database_exists:
            await connection.execute(
                f"CREATE DATABASE {_quote_identifier(cluster.database)} OWNER {role} "
                "TEMPLATE template0 ENCODING 'UTF8'"
            )
    finally:
        await connection.close()


def _quote_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _run_coroutine(coroutine: Coroutine[Any, Any, _T]) -> _T:
    """asyncio.run, also from code that already runs inside an event loop
    (e.g. an async fixture calling start_cluster), via a helper thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        in_event_loop = False
    else:
        in_event_loop = True
    if not in_event_loop:
        return asyncio.run(coroutine)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as executor:
        return executor.submit(asyncio.run, coroutine).result()


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devcluster",
        description="Run a local PostgreSQL cluster reachable only over verified TLS.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="start (creating on first use) and print `export` lines")
    up.add_argument("directory", type=Path)
    up.add_argument(
        "--port", type=int, default=None, help="port to use instead of the recorded one"
    )
    down = commands.add_parser("down", help="stop the cluster")
    down.add_argument("directory", type=Path)
    down.add_argument("--mode", choices=("smart", "fast", "immediate"), default="fast")
    arguments = parser.parse_args(argv)

    try:
        if arguments.command == "up":
            cluster = start_cluster(arguments.directory, port=arguments.port, durable=True)
            for name, value in cluster.service_env().items():
                print(f"export {name}={shlex.quote(value)}")
            print(
                f"cluster running on {cluster.host}:{cluster.port} ({cluster.data_dir})",
                file=sys.stderr,
            )
        else:
            stop_cluster(arguments.directory, mode=arguments.mode)
    except RuntimeError as error:
        print(f"devcluster: {error}", file=sys.stderr)
        return 1
    return 0
