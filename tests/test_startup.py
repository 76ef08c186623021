"""The service refuses to start on an unverified or misconfigured database
connection, with a clear message and without falling back to plain text;
the explicit development opt-in works and says so loudly; a taken port is
an error, not a shared port; settings never show the password."""

from __future__ import annotations

import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devcluster.cluster import Cluster, make_ca_only
from devcluster.process import process_env, service_process
from service.app import App
from service.errors import StartupError
from service.settings import Settings, SettingsError
from tests.support.apps import running_app
from tests.support.database import ServerLog
from tests.support.processes import EXIT_CONFIG

PLAIN_TEXT_REJECTED = "no encryption"  # PostgreSQL's pg_hba message for a plain-text attempt


# --------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Refusal:
    name: str
    env: Callable[[Cluster, Path], dict[str, str]]
    error: type[Exception]
    fragments: tuple[str, ...]
    # An unverified TLS failure must not be followed by a plain-text attempt.
    checks_no_plain_text: bool = field(default=False)


def _url(cluster: Cluster, query: str = "", host: str | None = None) -> str:
    return cluster.dsn(host=host) + (f"?{query}" if query else "")


REFUSALS = [
    Refusal(
        "wrong-ca",
        lambda c, tmp: {"PGSSLROOTCERT": str(make_ca_only(tmp, "impostor CA"))},
        StartupError,
        (
            "cannot verify the database server's certificate",
            "unable to get local issuer certificate",
        ),
        checks_no_plain_text=True,
    ),
    Refusal(
        "host-not-on-certificate",
        # The cluster listens on 127.0.0.2, but its certificate names only
        # localhost and 127.0.0.1.
        lambda c, tmp: {"DATABASE_URL": _url(c, host="127.0.0.2")},
        StartupError,
        ("cannot verify the database server's certificate", "127.0.0.2", "mismatch"),
        checks_no_plain_text=True,
    ),
    Refusal(
        "missing-ca-file",
        lambda c, tmp: {"PGSSLROOTCERT": str(tmp / "no-such-ca.crt")},
        StartupError,
        ("no-such-ca.crt", "does not exist"),
        checks_no_plain_text=True,
    ),
    Refusal(
        "disable-without-opt-in",
        lambda c, tmp: {"DATABASE_URL": _url(c, "sslmode=disable")},
        StartupError,
        ("sslmode=disable", "ORDERSTREAM_ALLOW_INSECURE_DATABASE"),
    ),
    Refusal(
        "require-without-opt-in",
        lambda c, tmp: {"PGSSLMODE": "require"},
        StartupError,
        ("sslmode=require", "ORDERSTREAM_ALLOW_INSECURE_DATABASE"),
    ),
    Refusal(
        "prefer-even-with-opt-in",
        lambda c, tmp: {
            "DATABASE_URL": _url(c, "sslmode=prefer"),
            "ORDERSTREAM_ALLOW_INSECURE_DATABASE": "1",
        },
        SettingsError,
        ("sslmode=prefer", "plain text"),
    ),
    Refusal(
        "allow-even-with-opt-in",
        lambda c, tmp: {"PGSSLMODE": "allow", "ORDERSTREAM_ALLOW_INSECURE_DATABASE": "1"},
        SettingsError,
        ("sslmode=allow", "plain text"),
    ),
    Refusal(
        # Neither libpq nor asyncpg speaks TLS over a Unix socket.
        "unix-socket-host",
        lambda c, tmp: {"DATABASE_URL": _url(c, host="%2Fvar%2Frun%2Fpostgresql")},
        StartupError,
        ("the Unix socket /var/run/postgresql", "ORDERSTREAM_ALLOW_INSECURE_DATABASE"),
    ),
    Refusal(
        "unix-socket-host-parameter",
        lambda c, tmp: {"DATABASE_URL": _url(c, "host=/tmp")},
        StartupError,
        ("the Unix socket /tmp", "ORDERSTREAM_ALLOW_INSECURE_DATABASE"),
    ),
    Refusal(
        "no-host-tries-the-unix-socket",
        lambda c, tmp: {"DATABASE_URL": f"postgresql://{c.app_user}:{c.app_password}@/db"},
        StartupError,
        ("no host", "Unix socket", "ORDERSTREAM_ALLOW_INSECURE_DATABASE"),
    ),
    Refusal(
        "unsupported-ssl-parameters",
        lambda c, tmp: {"DATABASE_URL": _url(c, "sslcrldir=/etc/crl&sslpassword=x")},
        SettingsError,
        ("DATABASE_URL", "not support", "sslcrldir, sslpassword"),
    ),
    Refusal(
        "unsupported-pgssl-variable",
        lambda c, tmp: {"PGSSLCOMPRESSION": "1"},
        SettingsError,
        ("not support", "PGSSLCOMPRESSION"),
    ),
    Refusal(
        "tls-version-that-does-not-exist",
        lambda c, tmp: {"DATABASE_URL": _url(c, "ssl_min_protocol_version=TLSv9.9")},
        SettingsError,
        ("ssl_min_protocol_version", "'TLSv9.9'", "TLSv1.2, TLSv1.3"),
    ),
    Refusal(
        "tls-maximum-below-minimum",
        lambda c, tmp: {"PGSSLMINPROTOCOLVERSION": "TLSv1.3", "PGSSLMAXPROTOCOLVERSION": "TLSv1.2"},
        SettingsError,
        ("ssl_max_protocol_version=TLSv1.2", "below", "ssl_min_protocol_version=TLSv1.3"),
    ),
    Refusal(
        "missing-crl-file",
        lambda c, tmp: {"DATABASE_URL": _url(c, f"sslcrl={tmp / 'no-such.crl'}")},
        StartupError,
        ("no-such.crl", "does not exist"),
    ),
    Refusal(
        # The pool writes and the feed LISTENs: a session on a standby can do neither.
        "primary-url-that-accepts-a-standby",
        lambda c, tmp: {"DATABASE_URL": _url(c, "target_session_attrs=prefer-standby")},
        SettingsError,
        ("DATABASE_URL", "target_session_attrs", "read-write, primary", "'prefer-standby'"),
    ),
    Refusal(
        "malformed-port",
        lambda c, tmp: {"ORDERSTREAM_PORT": "abc"},
        SettingsError,
        ("ORDERSTREAM_PORT", "'abc'"),
    ),
    Refusal(
        # A stream waiting on its reader sits idle in its transaction:
        # PostgreSQL must not end it before the write-stall timeout does.
        "idle-in-transaction-backstop-not-above-write-stall",
        lambda c, tmp: {
            "ORDERSTREAM_IDLE_IN_TRANSACTION_TIMEOUT": "20",
            "ORDERSTREAM_WRITE_STALL_TIMEOUT": "20",
        },
        SettingsError,
        (
            "ORDERSTREAM_IDLE_IN_TRANSACTION_TIMEOUT",
            "must exceed",
            "ORDERSTREAM_WRITE_STALL_TIMEOUT",
        ),
    ),
]


def _secrets(cluster: Cluster, service_env: dict[str, str]) -> list[str]:
    return [cluster.app_password, cluster.admin_password, service_env["ORDERSTREAM_PAGE_TOKEN_KEY"]]


@pytest.mark.parametrize("case", REFUSALS, ids=lambda case: case.name)
async def test_refuses_to_start_in_process(case, pg_cluster, service_env, tmp_path):
    server_log = ServerLog(pg_cluster)
    env = {**service_env, **case.env(pg_cluster, tmp_path)}
    with pytest.raises(case.error) as raised:
        app = await App.start(Settings.from_env(env))
        await app.stop(grace=1)  # only reached if the refusal is missing
    message = str(raised.value)
    for fragment in case.fragments:
        assert fragment in message
    for secret in _secrets(pg_cluster, service_env):
        assert secret not in message
    if case.checks_no_plain_text:
        assert PLAIN_TEXT_REJECTED not in server_log.new_text()


@pytest.mark.parametrize("case", REFUSALS, ids=lambda case: case.name)
async def test_refuses_to_start_as_a_process(case, pg_cluster, service_env, tmp_path):
    """Exit code 2, one clear ERROR record naming the problem, no traceback,
    no secret anywhere in the output."""
    server_log = ServerLog(pg_cluster)
    env = process_env(service_env, **case.env(pg_cluster, tmp_path))
    async with service_process(env, "serve") as child:
        code = await child.exit_code()
    assert code == EXIT_CONFIG, child.output
    errors = [r for r in child.records if r.get("level") == "ERROR"]
    assert len(errors) == 1, child.output
    for fragment in case.fragments:
        assert fragment in errors[0]["message"], child.output
    assert "Traceback" not in child.output
    for secret in _secrets(pg_cluster, service_env):
        assert secret not in child.output
    if case.checks_no_plain_text:
        assert PLAIN_TEXT_REJECTED not in server_log.new_text()


async def test_disable_with_opt_in_really_is_plain_text_and_the_cluster_refuses_it(
    pg_cluster, service_env
):
    """The control for the 'no plain-text fallback' checks above: a plain-text
    attempt does show up in the server log (and this cluster only takes TLS)."""
    server_log = ServerLog(pg_cluster)
    env = {
        **service_env,
        "DATABASE_URL": _url(pg_cluster, "sslmode=disable"),
        "ORDERSTREAM_ALLOW_INSECURE_DATABASE": "1",
    }
    with pytest.raises(StartupError, match="cannot connect to the database") as raised:
        await App.start(Settings.from_env(env))
    assert pg_cluster.app_password not in str(raised.value)
    assert PLAIN_TEXT_REJECTED in server_log.new_text()


# --------------------------------------------------------------------------
# The explicit development opt-in
# --------------------------------------------------------------------------


async def test_require_with_opt_in_serves_and_warns_loudly(pg_cluster, service_env):
    """sslmode=require (encrypted, unverified) + the opt-in: the service runs
    (default event loop, uvloop) and warns INSECURE before it serves."""
    env = process_env(
        service_env,
        DATABASE_URL=_url(pg_cluster, "sslmode=require"),
        ORDERSTREAM_ALLOW_INSECURE_DATABASE="1",
        ORDERSTREAM_EVENT_LOOP=None,
    )
    async with service_process(env, "serve") as child:
        serving = await child.record("serving")
        warnings = [
            r
            for r in child.records
            if r.get("level") == "WARNING" and "INSECURE" in r.get("message", "")
        ]
        assert warnings, child.output
        assert child.records.index(warnings[0]) < child.records.index(serving)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{serving['port']}") as channel:
            check = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
            assert check.status == health_pb2.HealthCheckResponse.SERVING
        child.process.send_signal(signal.SIGTERM)
        assert await child.exit_code() == 0, child.output
    assert pg_cluster.app_password not in child.output


# --------------------------------------------------------------------------
# The port
# --------------------------------------------------------------------------


async def test_second_server_on_a_taken_port_fails_instead_of_sharing_it(service_env):
    async with running_app(service_env) as first:
        env = process_env(service_env, ORDERSTREAM_PORT=str(first.port))
        async with service_process(env, "serve") as second:
            code = await second.exit_code()
        assert code == EXIT_CONFIG, second.output
        errors = [r for r in second.records if r.get("level") == "ERROR"]
        assert errors and "cannot listen" in errors[0]["message"], second.output
        assert str(first.port) in errors[0]["message"]
        assert not any(r.get("message") == "serving" for r in second.records)
        # The first server still owns the port and answers.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{first.port}") as channel:
            check = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
            assert check.status == health_pb2.HealthCheckResponse.SERVING


# --------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------


def test_settings_and_database_target_never_show_the_password(pg_cluster, service_env):
    password = pg_cluster.app_password
    settings = Settings.from_env(
        {**service_env, "DATABASE_URL": _url(pg_cluster, "sslmode=verify-full&connect_timeout=5")}
    )
    target = settings.database
    assert password in target.dsn.reveal()  # it is there, only hidden
    page_key = service_env["ORDERSTREAM_PAGE_TOKEN_KEY"]
    for text in (
        repr(settings),
        str(settings),
        repr(target),
        str(target),
        f"{target.dsn}",
        target.describe(),
    ):
        assert password not in text
        assert page_key not in text
    assert target.host == pg_cluster.host
    assert target.port == pg_cluster.port
    assert target.ssl_mode == "verify-full"
    # ssl* parameters are taken out of the DSN handed to asyncpg; others stay.
    assert "sslmode" not in target.dsn.reveal()
    assert "connect_timeout=5" in target.dsn.reveal()


def test_a_multi_host_url_keeps_every_host_and_port_in_order(service_env):
    """libpq's form; asyncpg gets the URL as it is, the session attributes
    as an argument (the primary's pool read-write by default, the
    replica's preferring a standby)."""
    settings = Settings.from_env(
        {
            **service_env,
            "DATABASE_URL": "postgresql://u:p@db-a:5433,[fd00::2],db-c:6000/orders",
            "ORDERSTREAM_REPLICA_DATABASE_URL": "postgresql://u:p@db-b,db-a/orders",
        }
    )
    primary, replica = settings.database, settings.replica
    assert replica is not None
    assert primary.addresses == (("db-a", 5433), ("fd00::2", 5432), ("db-c", 6000))
    assert (primary.host, primary.port) == ("db-a", 5433)
    assert primary.target_session_attrs == "read-write"
    assert settings.direct_database.target_session_attrs == "read-write"
    assert replica.addresses == (("db-b", 5432), ("db-a", 5432))
    assert replica.target_session_attrs == "prefer-standby"
    assert "db-a:5433, [fd00::2]:5432, db-c:6000" in primary.describe()


def test_target_session_attrs_come_from_the_url_before_the_variable(service_env):
    env = {**service_env, "PGTARGETSESSIONATTRS": "primary"}
    assert Settings.from_env(env).database.target_session_attrs == "primary"
    env["DATABASE_URL"] = service_env["DATABASE_URL"] + "?target_session_attrs=read-write"
    target = Settings.from_env(env).database
    assert target.target_session_attrs == "read-write"
    assert "target_session_attrs" not in target.dsn.reveal()


def test_malformed_setting_names_the_variable(service_env):
    with pytest.raises(SettingsError, match="ORDERSTREAM_PORT") as raised:
        Settings.from_env({**service_env, "ORDERSTREAM_PORT": "abc"})
    assert "abc" in str(raised.value)


def test_defaults_serve_on_50051_with_a_verified_database(pg_cluster):
    """Only the database is required; everything else has the documented default."""
    settings = Settings.from_env(pg_cluster.service_env())
    assert settings.port == 50051
    assert settings.database.ssl_mode == "verify-full"
