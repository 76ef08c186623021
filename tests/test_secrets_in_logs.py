"""Tokens and passwords never reach the logs: a real `python -m service`
process, at DEBUG, is sent failed logins (unknown, malformed and
under-scoped tokens) and loses its database login while serving; another
starts with a wrong database password. Everything both processes wrote is
then searched for every secret, raw, digested and URL-quoted."""

from __future__ import annotations

import hashlib
import secrets
import signal
from urllib.parse import quote

import grpc
import pytest

from devcluster.cluster import Cluster
from devcluster.process import process_env, service_process
from orderstream.orders.v1 import order_service_pb2, order_service_pb2_grpc
from tests.support.processes import EXIT_CONFIG
from tests.support.requests import create_request, unique
from tests.support.status import rpc_error
from tests.support.tokens import bearer, write_tokens_file


def forms(secret: str) -> set[str]:
    """How a secret could show up in a log line."""
    return {
        secret,
        quote(secret, safe=""),
        hashlib.sha256(secret.encode()).hexdigest(),
        repr(secret)[1:-1],
    }


def role_url(cluster: Cluster, role: str, password: str) -> str:
    return (
        f"postgresql://{role}:{quote(password, safe='')}@{cluster.host}:{cluster.port}/"
        f"{cluster.database}"
    )


@pytest.mark.slow
async def test_no_token_or_password_in_the_logs(service_env, pg_cluster, admin_db, tmp_path):
    tokens = write_tokens_file(tmp_path)
    forged = secrets.token_urlsafe(32)
    basic_password = secrets.token_urlsafe(16)
    role = unique("logs").replace("-", "_")
    password = f"pw'{secrets.token_urlsafe(16)}%@"  # characters a URL must quote
    wrong_password = secrets.token_urlsafe(16)
    literal = password.replace("'", "''")  # DDL takes no parameters
    await admin_db.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{literal}'")
    await admin_db.execute(f"GRANT {pg_cluster.app_user} TO {role}")
    try:
        env = process_env(
            service_env,
            DATABASE_URL=role_url(pg_cluster, role, password),
            ORDERSTREAM_AUTH_TOKENS_FILE=str(tokens.file),
            ORDERSTREAM_LOG_LEVEL="DEBUG",
            ORDERSTREAM_MIGRATE_ON_START="false",
            ORDERSTREAM_POOL_ACQUIRE_TIMEOUT="1",
        )
        async with service_process(env, "serve") as serving:
            port = (await serving.record("serving"))["port"]
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = order_service_pb2_grpc.OrderServiceStub(channel)
                failed_logins = [
                    bearer(forged),
                    (("authorization", f"Basic {basic_password}"),),
                    (("authorization", f"Bearer {forged} {tokens.both}"),),
                    (("authorization", tokens.both),),  # no scheme
                    bearer(tokens.reader),  # CreateOrder needs write
                ]
                for metadata in failed_logins:
                    error = await rpc_error(stub.CreateOrder(create_request(), metadata=metadata))
                    assert error.code in (
                        grpc.StatusCode.UNAUTHENTICATED,
                        grpc.StatusCode.PERMISSION_DENIED,
                    )
                order = await stub.CreateOrder(create_request(), metadata=bearer(tokens.both))

                # The database stops accepting the service's password.
                await admin_db.execute(f"ALTER ROLE {role} PASSWORD '{wrong_password}'")
                await admin_db.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1",
                    role,
                )
                await serving.record("database unreachable: NOT_SERVING")
                error = await rpc_error(
                    stub.GetOrder(
                        order_service_pb2.GetOrderRequest(id=order.id),
                        metadata=bearer(tokens.reader),
                    )
                )
                assert error.code == grpc.StatusCode.UNAVAILABLE
            serving.process.send_signal(signal.SIGTERM)
            assert await serving.exit_code() == 0, serving.output
        refusals = [r for r in serving.records if r.get("message") == "call refused"]
        assert {r["reason"] for r in refusals} == {
            "TOKEN_UNKNOWN",
            "TOKEN_MALFORMED",
            "SCOPE_MISSING",
        }, serving.output
        # The lost login was logged, password exceptions and all.
        assert "InvalidPasswordError" in serving.output

        # Startup with a password the database refuses.
        env["DATABASE_URL"] = role_url(pg_cluster, role, password)
        async with service_process(env, "serve") as refused:
            assert await refused.exit_code() == EXIT_CONFIG, refused.output
        assert any("cannot start" in r.get("message", "") for r in refused.records)
    finally:
        await admin_db.execute(f"DROP ROLE IF EXISTS {role}")

    logs = serving.output + "\n" + refused.output
    secret_values = {
        "reader token": tokens.reader,
        "writer token": tokens.writer,
        "read-write token": tokens.both,
        "forged token": forged,
        "basic credentials": basic_password,
        "database password": password,
        "changed database password": wrong_password,
        "page-token key": service_env["ORDERSTREAM_PAGE_TOKEN_KEY"],
    }
    # Names only: the assertion message must not print the secret either.
    leaked = sorted(
        name for name, secret in secret_values.items() if any(f in logs for f in forms(secret))
    )
    assert leaked == []
