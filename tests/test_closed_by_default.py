"""Closed by default: without caller authentication (tokens, or client
certificates mapped to scopes) the service refuses to start unless the
development switch ORDERSTREAM_INSECURE_DEV is set, and with the switch it
says loudly what it leaves open. And the limits that bound what one caller
can hold open have defaults: streams per connection, calls in progress,
health Watch streams."""

from __future__ import annotations

import signal

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devcluster.cluster import make_certificates
from devcluster.process import process_env, service_process
from service.errors import StartupError
from service.settings import Settings
from tests.support.apps import app_with_channel, closed, running_app
from tests.support.client_identity import client_identity
from tests.support.polling import eventually
from tests.support.processes import EXIT_CONFIG
from tests.support.status import rpc_error
from tests.support.tokens import write_tokens_file

SERVING = health_pb2.HealthCheckResponse.SERVING
REFUSAL = (
    "refusing to serve without caller authentication",
    "ORDERSTREAM_AUTH_TOKENS_FILE",
    "ORDERSTREAM_AUTH_CERT_IDENTITIES_FILE",
    "ORDERSTREAM_INSECURE_DEV=1",
)


async def test_without_caller_authentication_it_refuses_to_start(service_env):
    with pytest.raises(StartupError) as raised:
        async with running_app(closed(service_env)):
            pass
    for fragment in REFUSAL:
        assert fragment in str(raised.value)


async def test_mtls_alone_is_not_caller_authentication(service_env, tmp_path):
    """Every certificate its CA signed could call every method."""
    certs = make_certificates(tmp_path / "tls", hosts=("127.0.0.1",))
    client_ca = tmp_path / "client-ca.crt"
    client_ca.write_bytes(client_identity("anyone").ca_cert)
    env = {
        **closed(service_env),
        "ORDERSTREAM_TLS_CERT": str(certs.server_cert),
        "ORDERSTREAM_TLS_KEY": str(certs.server_key),
        "ORDERSTREAM_TLS_CLIENT_CA": str(client_ca),
    }
    with pytest.raises(StartupError) as raised:
        async with running_app(env):
            pass
    assert "ORDERSTREAM_TLS_CLIENT_CA alone" in str(raised.value)
    for fragment in REFUSAL:
        assert fragment in str(raised.value)


@pytest.mark.parametrize("args", [("serve",), ("serve", "--workers", "2")], ids=" ".join)
async def test_the_refusal_as_a_process_is_one_clear_error_and_exit_2(service_env, args):
    """With workers too: refused once, before forking."""
    env = process_env(service_env, ORDERSTREAM_INSECURE_DEV=None)
    async with service_process(env, *args) as child:
        code = await child.exit_code()
    assert code == EXIT_CONFIG, child.output
    errors = [r for r in child.records if r.get("level") == "ERROR"]
    assert len(errors) == 1, child.output
    for fragment in REFUSAL:
        assert fragment in errors[0]["message"], child.output
    assert "Traceback" not in child.output
    assert not any(r.get("message") == "serving" for r in child.records)


async def test_tokens_are_caller_authentication(service_env, tmp_path):
    tokens = write_tokens_file(tmp_path)
    env = {**closed(service_env), "ORDERSTREAM_AUTH_TOKENS_FILE": str(tokens.file)}
    async with (
        running_app(env) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel,
    ):
        check = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
        assert check.status == SERVING


async def test_the_switch_says_loudly_what_is_open_before_serving(service_env):
    """`make run`'s case: plain text, no caller authentication, reflection."""
    env = process_env(service_env, ORDERSTREAM_INSECURE_DEV="1")
    async with service_process(env, "serve") as child:
        serving = await child.record("serving")
        warnings = [
            r
            for r in child.records
            if r.get("level") == "WARNING" and "INSECURE DEVELOPMENT MODE" in r["message"]
        ]
        assert len(warnings) == 1, child.output
        for what in (
            "ORDERSTREAM_INSECURE_DEV=1",
            "plain text",
            "no caller authentication",
            "reflection",
        ):
            assert what in warnings[0]["message"], child.output
        assert child.records.index(warnings[0]) < child.records.index(serving)
        child.process.send_signal(signal.SIGTERM)
        assert await child.exit_code() == 0, child.output


# --------------------------------------------------------------------------
# Limits with production defaults
# --------------------------------------------------------------------------


def test_the_limits_have_defaults(pg_cluster):
    settings = Settings.from_env(pg_cluster.service_env())
    assert settings.max_concurrent_streams == 1000
    assert settings.max_health_watches == 1000
    # Room for every follower, and a thousand calls more (health watches
    # have their own bound).
    assert settings.max_concurrent_rpcs == 2000 + 1000
    raised = Settings.from_env({**pg_cluster.service_env(), "ORDERSTREAM_MAX_FOLLOWERS": "5000"})
    assert raised.max_concurrent_rpcs == 5000 + 1000


async def watching(stub: health_pb2_grpc.HealthStub) -> grpc.aio.UnaryStreamCall:
    """A Watch stream the server has taken (it has sent the first status)."""
    call = stub.Watch(health_pb2.HealthCheckRequest())
    first = await call.read()
    assert first.status == SERVING
    return call


async def test_health_watches_past_the_bound_are_resource_exhausted(service_env):
    async with app_with_channel(service_env, ORDERSTREAM_MAX_HEALTH_WATCHES="2") as (_, channel):
        stub = health_pb2_grpc.HealthStub(channel)
        held = [await watching(stub), await watching(stub)]
        refused = await rpc_error(stub.Watch(health_pb2.HealthCheckRequest()).read())
        assert refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert refused.error_info is not None
        assert refused.error_info.reason == "TOO_MANY_HEALTH_WATCHES"
        assert refused.error_info.metadata["limit"] == "2"
        assert refused.retry_info is not None
        assert "ORDERSTREAM_MAX_HEALTH_WATCHES" in refused.message
        # Check is not a watch.
        check = await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert check.status == SERVING
        held[0].cancel()

        async def another_watch_is_served() -> bool:
            try:
                held[0] = await watching(stub)
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                return False
            return True

        await eventually(another_watch_is_served, what="the cancelled watch to be let go")
        for call in held:
            call.cancel()


async def test_streams_per_connection_are_bounded(service_env):
    """Past ORDERSTREAM_MAX_CONCURRENT_STREAMS on one connection a gRPC
    client queues the next call (here until its deadline); another
    connection is served."""
    async with app_with_channel(service_env, ORDERSTREAM_MAX_CONCURRENT_STREAMS="2") as (
        app,
        channel,
    ):
        stub = health_pb2_grpc.HealthStub(channel)
        held = [await watching(stub), await watching(stub)]
        queued = await rpc_error(stub.Check(health_pb2.HealthCheckRequest(), timeout=1))
        assert queued.code == grpc.StatusCode.DEADLINE_EXCEEDED
        # A subchannel of its own: gRPC would share the first one's connection.
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{app.port}", options=[("grpc.use_local_subchannel_pool", 1)]
        ) as other:
            check = await health_pb2_grpc.HealthStub(other).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
            assert check.status == SERVING
        held[0].cancel()
        check = await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert check.status == SERVING
        held[1].cancel()
