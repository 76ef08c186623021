"""The database connection's TLS edges, against real PostgreSQL: a Unix
socket (no TLS whatever the sslmode) is refused before anything is sent
unless ORDERSTREAM_ALLOW_INSECURE_DATABASE is set; `sslcrl` revokes the
server's certificate; `ssl_min_protocol_version` and
`ssl_max_protocol_version` bound the protocol PostgreSQL negotiates; every
host of a multi-host URL is verified against its own name. (The
refusals of unsupported or invalid ssl* settings, in process and as a
process, are in tests/test_startup.py.)"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from devcluster.cluster import Cluster, start_cluster, stop_cluster
from devcluster.throwaway import scratch_directory
from service.db.pool import close_pool, open_pool
from service.errors import StartupError
from service.settings import Settings
from tests.support.apps import running_app
from tests.support.database import multi_host_dsn
from tests.support.revocation import RevocableCertificates, write_revocable_certificates


class FakeServer:
    """A listener on a Unix socket that records what a client sends first."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.connected = asyncio.Event()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.received.append(await reader.read(4096))
        self.connected.set()
        writer.close()


@contextlib.asynccontextmanager
async def fake_socket_server(port: int) -> AsyncIterator[tuple[str, FakeServer]]:
    """A socket directory (short: socket paths are limited to 107 bytes)
    with libpq's socket name for `port` in it."""
    with scratch_directory("os-sock-") as directory:
        fake = FakeServer()
        server = await asyncio.start_unix_server(
            fake.handle, path=str(directory / f".s.PGSQL.{port}")
        )
        try:
            yield str(directory), fake
        finally:
            server.close()
            await server.wait_closed()


def socket_url(cluster: Cluster, directory: str) -> str:
    return cluster.dsn(host=directory.replace("/", "%2F"))


async def test_a_unix_socket_host_is_refused_before_anything_is_sent(
    service_env, pg_cluster, caplog
):
    async with fake_socket_server(pg_cluster.port) as (directory, fake):
        env = {**service_env, "DATABASE_URL": socket_url(pg_cluster, directory)}
        with pytest.raises(StartupError) as raised:
            async with running_app(env):
                pass
        message = str(raised.value)
        assert f"the Unix socket {directory}" in message
        assert "ORDERSTREAM_ALLOW_INSECURE_DATABASE" in message
        assert pg_cluster.app_password not in message
        assert fake.received == []
        # The control: with the opt-in the startup packet goes out in plain
        # text (the user's name readable on the wire), and it says so.
        env["ORDERSTREAM_ALLOW_INSECURE_DATABASE"] = "1"
        with pytest.raises(StartupError, match="cannot connect to the database"):
            async with running_app(env):
                pass
        assert fake.connected.is_set()
        assert pg_cluster.app_user.encode() in fake.received[0]
    assert any("INSECURE DATABASE CONNECTION" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("where", ["url", "variable"])
@pytest.mark.parametrize(("bound", "negotiated"), [("max", "TLSv1.2"), ("min", "TLSv1.3")])
async def test_the_tls_protocol_bounds_are_honoured(
    service_env, pg_cluster, where, bound, negotiated
):
    parameter, variable = {
        "min": ("ssl_min_protocol_version", "PGSSLMINPROTOCOLVERSION"),
        "max": ("ssl_max_protocol_version", "PGSSLMAXPROTOCOLVERSION"),
    }[bound]
    env = dict(service_env)
    if where == "url":
        env["DATABASE_URL"] = f"{pg_cluster.dsn()}?{parameter}={negotiated}"
    else:
        env[variable] = negotiated
    pool = await open_pool(Settings.from_env(env))
    try:
        version = await pool.fetchval(
            "SELECT version FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
        )
    finally:
        await close_pool(pool, 5)
    assert version == negotiated


# 127.0.0.2 reaches the same server, whose certificate names only localhost
# and 127.0.0.1 (devcluster/cluster.py): verify-full must refuse it.
MISMATCH = "127.0.0.2"


async def test_a_multi_host_url_skips_a_host_whose_certificate_does_not_match(
    service_env, pg_cluster
):
    env = {
        **service_env,
        "DATABASE_URL": multi_host_dsn(
            pg_cluster, f"{MISMATCH}:{pg_cluster.port}", f"127.0.0.1:{pg_cluster.port}"
        ),
    }
    pool = await open_pool(Settings.from_env(env))
    try:
        # The same server answers on both: only the address shows which host
        # the connection stayed on.
        address = await pool.fetchval("SELECT host(inet_server_addr())")
    finally:
        await close_pool(pool, 5)
    assert address == "127.0.0.1"


async def test_a_multi_host_url_whose_hosts_all_fail_verification_stops_startup(
    service_env, pg_cluster
):
    env = {
        **service_env,
        "DATABASE_URL": multi_host_dsn(pg_cluster, *[f"{MISMATCH}:{pg_cluster.port}"] * 2),
    }
    with pytest.raises(StartupError) as raised:
        await open_pool(Settings.from_env(env))
    message = str(raised.value)
    assert "cannot verify the database server's certificate" in message
    assert f"{MISMATCH}:{pg_cluster.port}, {MISMATCH}:{pg_cluster.port}" in message
    assert "IP address mismatch" in message


# --------------------------------------------------------------------------
# sslcrl: a cluster of its own, whose CA key this module keeps
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def revocable() -> Iterator[tuple[Cluster, RevocableCertificates]]:
    with scratch_directory("orderstream-crl-") as base:
        # make_certificates keeps the files it finds in the cluster's tls/.
        certificates = write_revocable_certificates(base / "tls")
        cluster = start_cluster(base, durable=False)
        try:
            yield cluster, certificates
        finally:
            stop_cluster(cluster)


def crl_env(service_env: dict[str, str], cluster: Cluster, crl: Path, where: str) -> dict[str, str]:
    env = {**service_env, **cluster.service_env()}
    if where == "url":
        env["DATABASE_URL"] = f"{cluster.dsn()}?sslcrl={crl}"
    else:
        env["PGSSLCRL"] = str(crl)
    return env


@pytest.mark.parametrize("where", ["url", "variable"])
async def test_a_revoked_server_certificate_stops_startup(service_env, revocable, tmp_path, where):
    cluster, certificates = revocable
    crl = tmp_path / "revoked.crl"
    crl.write_bytes(certificates.crl([certificates.server_serial]))
    with pytest.raises(StartupError) as raised:
        async with running_app(crl_env(service_env, cluster, crl, where)):
            pass
    assert "cannot verify the database server's certificate" in str(raised.value)
    assert "certificate revoked" in str(raised.value)


async def test_a_crl_that_revokes_another_certificate_lets_it_serve(
    service_env, revocable, tmp_path
):
    cluster, certificates = revocable
    crl = tmp_path / "other.crl"
    crl.write_bytes(certificates.crl([certificates.server_serial + 1]))
    async with running_app(crl_env(service_env, cluster, crl, "url")) as app:
        assert await app.pool.fetchval("SELECT 1") == 1


async def test_a_file_that_is_no_crl_stops_startup(service_env, revocable, tmp_path):
    cluster, _ = revocable
    crl = tmp_path / "garbage.crl"
    crl.write_text("not a CRL\n")
    with pytest.raises(StartupError, match="cannot load the database CRL"):
        async with running_app(crl_env(service_env, cluster, crl, "url")):
            pass
