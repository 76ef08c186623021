"""Checks that the dev cluster really is TLS-only with verified certificates."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import ssl
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from cryptography import x509

from devcluster.cluster import (
    Cluster,
    create_database,
    make_ca_only,
    make_certificates,
    start_cluster,
    stop_cluster,
)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    base_dir = Path(tempfile.mkdtemp(prefix="devcluster-test-"))
    try:
        started = start_cluster(base_dir, durable=False)
        try:
            yield started
        finally:
            stop_cluster(started, mode="immediate")
    finally:
        shutil.rmtree(base_dir, ignore_errors=True)


def _tls_context(ca_cert: Path, *, check_hostname: bool = True) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca_cert))
    context.check_hostname = check_hostname
    return context


def _connect(
    cluster: Cluster, *, host: str | None = None, ssl_option: Any = None, **overrides: Any
) -> Any:
    """Coroutine for an app_user connection, by default over TLS verified with the cluster's CA."""
    return asyncpg.connect(
        host=host or cluster.host,
        port=cluster.port,
        user=overrides.pop("user", cluster.app_user),
        password=overrides.pop("password", cluster.app_password),
        database=overrides.pop("database", cluster.database),
        ssl=_tls_context(cluster.certificates.ca_cert) if ssl_option is None else ssl_option,
        timeout=15,
        **overrides,
    )


async def _fetch_row(connect: Any, query: str) -> asyncpg.Record:
    connection = await connect
    try:
        return await connection.fetchrow(query)
    finally:
        await connection.close()


def test_verified_tls_connection_as_app_user(cluster: Cluster) -> None:
    row = asyncio.run(
        _fetch_row(
            _connect(cluster),
            """
            SELECT current_setting('ssl') AS ssl_setting,
                   s.ssl AS backend_ssl,
                   current_user AS user_name,
                   r.rolsuper AS is_superuser,
                   pg_get_userbyid(d.datdba) AS database_owner
            FROM pg_stat_ssl s, pg_roles r, pg_database d
            WHERE s.pid = pg_backend_pid()
              AND r.rolname = current_user
              AND d.datname = current_database()
            """,
        )
    )
    assert row["ssl_setting"] == "on"
    assert row["backend_ssl"] is True
    assert row["user_name"] == "orderstream"
    assert row["is_superuser"] is False
    assert row["database_owner"] == "orderstream"


def test_show_ssl_is_on(cluster: Cluster) -> None:
    row = asyncio.run(_fetch_row(_connect(cluster), "SHOW ssl"))
    assert row[0] == "on"


def test_dsn_and_service_env_connect(cluster: Cluster) -> None:
    env = cluster.service_env()
    assert env["PGSSLROOTCERT"] == str(cluster.certificates.ca_cert)
    assert "sslmode" not in env["DATABASE_URL"]
    row = asyncio.run(
        _fetch_row(
            asyncpg.connect(
                env["DATABASE_URL"], ssl=_tls_context(Path(env["PGSSLROOTCERT"])), timeout=15
            ),
            "SELECT current_user",
        )
    )
    assert row[0] == "orderstream"


def test_wrong_ca_is_rejected(cluster: Cluster, tmp_path: Path) -> None:
    other_ca = make_ca_only(tmp_path, "some other CA")
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
        asyncio.run(_fetch_row(_connect(cluster, ssl_option=_tls_context(other_ca)), "SELECT 1"))


def test_host_name_mismatch_is_rejected(cluster: Cluster) -> None:
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        asyncio.run(_fetch_row(_connect(cluster, host="127.0.0.2"), "SELECT 1"))

    # The same address with host-name checking off works, so the failure
    # above is the name check and not an unreachable listener.
    lenient = _tls_context(cluster.certificates.ca_cert, check_hostname=False)
    row = asyncio.run(
        _fetch_row(_connect(cluster, host="127.0.0.2", ssl_option=lenient), "SELECT 1")
    )
    assert row[0] == 1


def test_plain_text_is_rejected_by_pg_hba(cluster: Cluster) -> None:
    with pytest.raises(
        asyncpg.InvalidAuthorizationSpecificationError, match=r"no pg_hba\.conf entry"
    ):
        asyncio.run(_fetch_row(_connect(cluster, ssl_option=False), "SELECT 1"))


def test_admin_is_superuser_over_tls(cluster: Cluster) -> None:
    row = asyncio.run(
        _fetch_row(
            _connect(
                cluster,
                user=cluster.admin_user,
                password=cluster.admin_password,
                database="postgres",
            ),
            "SELECT rolsuper FROM pg_roles WHERE rolname = current_user",
        )
    )
    assert row[0] is True


def test_create_database_is_owned_by_app_user(cluster: Cluster) -> None:
    name = asyncio.run(create_database(cluster, "devcluster_test_fresh"))
    assert name == "devcluster_test_fresh"
    row = asyncio.run(
        _fetch_row(
            _connect(cluster, database=name),
            "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = current_database()",
        )
    )
    assert row[0] == "orderstream"


def test_files_and_configuration(cluster: Cluster) -> None:
    credentials = cluster.base_dir / "credentials.json"
    assert stat.S_IMODE(credentials.stat().st_mode) == 0o600
    hba_lines = [
        line.split()
        for line in (cluster.data_dir / "pg_hba.conf").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert {line[0] for line in hba_lines} == {"hostssl"}
    assert {line[3] for line in hba_lines} == {"127.0.0.1/32", "::1/128", "127.0.0.2/32"}
    assert {line[4] for line in hba_lines} == {"scram-sha-256"}

    text = repr(cluster)
    assert cluster.app_password not in text
    assert cluster.admin_password not in text


def test_server_certificate_names(tmp_path: Path) -> None:
    certificates = make_certificates(tmp_path, hosts=("localhost", "127.0.0.1", "::1"))
    server = x509.load_pem_x509_certificate(certificates.server_cert.read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    assert stat.S_IMODE(certificates.server_key.stat().st_mode) == 0o600
    # Idempotent: a second call returns the existing files untouched.
    before = certificates.ca_cert.read_bytes()
    assert make_certificates(tmp_path) == certificates
    assert certificates.ca_cert.read_bytes() == before


def test_stop_and_restart_reuses_credentials() -> None:
    base_dir = Path(tempfile.mkdtemp(prefix="devcluster-restart-"))
    try:
        first = start_cluster(base_dir, durable=False)
        stop_cluster(first)
        with pytest.raises(OSError):
            asyncio.run(_fetch_row(_connect(first), "SELECT 1"))
        stop_cluster(base_dir)  # already stopped: no error

        second = start_cluster(base_dir, durable=False)
        assert second == first  # same port, passwords and certificate paths
        assert second.certificates.ca_cert.read_bytes() == first.certificates.ca_cert.read_bytes()
        row = asyncio.run(_fetch_row(_connect(second), "SELECT current_user"))
        assert row[0] == "orderstream"

        # Starting an already running cluster just hands it back.
        assert start_cluster(base_dir, durable=False) == first
    finally:
        stop_cluster(base_dir, mode="immediate")
        shutil.rmtree(base_dir, ignore_errors=True)


def test_port_in_use_is_reported_and_leaves_cluster_alone(cluster: Cluster) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        with pytest.raises(RuntimeError, match=f"port {taken} is already in use"):
            start_cluster(cluster.base_dir, port=taken, durable=False)

    assert json.loads((cluster.base_dir / "credentials.json").read_text())["port"] == cluster.port
    row = asyncio.run(_fetch_row(_connect(cluster), "SELECT 1"))
    assert row[0] == 1
