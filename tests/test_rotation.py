"""Rotation without a rollout, against a real `python -m service` process:
the tokens file and the listener's certificate change under calls in
flight (by SIGHUP, and by the poll noticing a Kubernetes-style symlink
swap); calls already running go on, the next call meets the new
credentials, and a broken new file keeps the old ones. The access log
names each caller (a token's name, a client certificate's subject) and a
metric counts refusals by reason."""

from __future__ import annotations

import asyncio
import secrets
import signal
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from devcluster.cluster import Certificates, make_certificates
from devcluster.process import ServiceProcess, service_process
from orderstream.events.v1 import event_pb2, event_service_pb2, event_service_pb2_grpc
from orderstream.orders.v1 import order_service_pb2_grpc
from tests.support.client_identity import ClientIdentity, client_identity
from tests.support.connections import OWN_CONNECTION
from tests.support.processes import serve_env
from tests.support.requests import create_request, unique
from tests.support.secret_volume import SecretVolume
from tests.support.status import StatusDetails, rpc_error
from tests.support.tokens import bearer, digest

PUBLISH = "/orderstream.events.v1.EventService/PublishEvents"
STREAM = "/orderstream.events.v1.EventService/StreamEvents"
UPLOAD = "/orderstream.events.v1.EventService/UploadEvents"
# Connections, each its own, that must all meet a rotated certificate: with
# the default 32 acceptors, a certificate that reached only some of them
# would be missed by at least one of these.
NEW_CONNECTIONS = 24


def event(subject: str, n: int) -> event_pb2.Event:
    return event_pb2.Event(
        type="com.example.rotation", source="/tests", subject=subject, json_payload=f'{{"n": {n}}}'
    )


async def publish(
    channel: grpc.aio.Channel, subject: str, n: int, metadata: tuple[tuple[str, str], ...] = ()
) -> None:
    stub = event_service_pb2_grpc.EventServiceStub(channel)
    await stub.PublishEvents(
        event_service_pb2.PublishEventsRequest(events=[event(subject, n)]),
        metadata=metadata,
        timeout=10,
    )


async def next_payload(follower: Any) -> str:
    """The payload of the follow stream's next event."""
    async with asyncio.timeout(10):
        response = await follower.read()
    assert response is not grpc.aio.EOF
    [received] = response.events
    return str(received.json_payload)


async def reload_by_sighup(child: ServiceProcess, outcome: str) -> dict[str, Any]:
    """SIGHUP, then the record of what the service made of it."""
    seen = len(child.records)
    child.process.send_signal(signal.SIGHUP)
    return await child.record(outcome, after=seen)


def refusals(metrics_port: int) -> dict[str, float]:
    """orderstream_refused_calls_total, by reason."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return {
        sample.labels["reason"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "orderstream_refused_calls_total"
    }


def tokens_file(**scopes_by_name: tuple[str, str]) -> bytes:
    """A tokens file: name -> (token, scopes)."""
    return "".join(
        f"{name} {digest(token)} {scopes}\n" for name, (token, scopes) in scopes_by_name.items()
    ).encode()


def access_lines(child: ServiceProcess, method: str) -> list[dict[str, Any]]:
    return [r for r in child.records if r.get("message") == "rpc" and r.get("method") == method]


# --------------------------------------------------------------------------
# Tokens
# --------------------------------------------------------------------------


async def test_tokens_rotate_under_a_stream_in_flight(service_env, login, tmp_path):
    old, kept, new, reader = (secrets.token_urlsafe(32) for _ in range(4))
    tokens = tmp_path / "tokens"
    tokens.write_bytes(
        tokens_file(ops_old=(old, "read,write"), ops_kept=(kept, "write"), dash=(reader, "read"))
    )
    env = serve_env(service_env, login, grace=5, event_loop=None)
    env.update(
        ORDERSTREAM_AUTH_TOKENS_FILE=str(tokens),
        ORDERSTREAM_METRICS_PORT="0",
        ORDERSTREAM_MAX_FOLLOWERS="1",
        # Only SIGHUP reloads here; the poll has its test below.
        ORDERSTREAM_RELOAD_INTERVAL="3600",
    )
    subject = unique("rotation-subject")
    async with service_process(env, "serve") as child:
        serving = await child.wait_serving()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{child.port}") as channel:
            events = event_service_pb2_grpc.EventServiceStub(channel)
            follower = events.StreamEvents(
                event_service_pb2.StreamEventsRequest(subject=subject, follow=True),
                metadata=bearer(old),
            )
            await publish(channel, subject, 1, bearer(kept))
            assert await next_payload(follower) == '{"n": 1}'

            # Revoke `old`, add `new`, under the follower `old` opened.
            tokens.write_bytes(
                tokens_file(
                    ops_kept=(kept, "write"), ops_new=(new, "read,write"), dash=(reader, "read")
                )
            )
            reloaded = await reload_by_sighup(child, "reloaded")
            assert reloaded["what"] == "tokens file"

            # The new token works at once; the stream opened with the
            # revoked one goes on and sees its event.
            await publish(channel, subject, 2, bearer(new))
            assert await next_payload(follower) == '{"n": 2}'
            revoked = await rpc_error(
                events.PublishEvents(
                    event_service_pb2.PublishEventsRequest(events=[event(subject, 3)]),
                    metadata=bearer(old),
                )
            )
            assert_refused(revoked, grpc.StatusCode.UNAUTHENTICATED, "TOKEN_UNKNOWN")

            # A broken file (a token pasted in plain, not its digest) is
            # refused and logged without its content; the table stays.
            tokens.write_text(f"ops_new {new} read,write\n")
            refused = await reload_by_sighup(child, "reload refused")
            assert refused["what"] == "tokens file"
            assert "line 1: the digest must be 64 lowercase hex digits" in refused["error"]
            assert new not in child.output and digest(new) not in child.output
            await publish(channel, subject, 4, bearer(new))
            assert await next_payload(follower) == '{"n": 4}'
            again = await rpc_error(
                events.PublishEvents(
                    event_service_pb2.PublishEventsRequest(events=[event(subject, 5)]),
                    metadata=bearer(old),
                )
            )
            assert_refused(again, grpc.StatusCode.UNAUTHENTICATED, "TOKEN_UNKNOWN")

            # Every refusal reason the interceptor and the slots give.
            orders = order_service_pb2_grpc.OrderServiceStub(channel)
            no_token = await rpc_error(orders.CreateOrder(create_request()))
            assert_refused(no_token, grpc.StatusCode.UNAUTHENTICATED, "TOKEN_MISSING")
            malformed = await rpc_error(
                orders.CreateOrder(create_request(), metadata=(("authorization", new),))
            )
            assert_refused(malformed, grpc.StatusCode.UNAUTHENTICATED, "TOKEN_MALFORMED")
            unscoped = await rpc_error(
                orders.CreateOrder(create_request(), metadata=bearer(reader))
            )
            assert_refused(unscoped, grpc.StatusCode.PERMISSION_DENIED, "SCOPE_MISSING")
            second_follower = await rpc_error(
                follow_once(events, subject, bearer(new)),
            )
            assert_refused(second_follower, grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_STREAMS")
            assert await asyncio.to_thread(refusals, serving["metrics_port"]) == {
                "TOKEN_UNKNOWN": 2.0,
                "TOKEN_MISSING": 1.0,
                "TOKEN_MALFORMED": 1.0,
                "SCOPE_MISSING": 1.0,
                "TOO_MANY_STREAMS": 1.0,
            }

            # A graceful stop ends the follower and writes every access line.
            assert await child.stop(15) == 0

        # The access log names each caller by its token's name, never the token.
        publishers = [line["caller"] for line in access_lines(child, PUBLISH)]
        assert publishers == ["ops_kept", "ops_new", "ops_new"]
        streams = {line["code"]: line["caller"] for line in access_lines(child, STREAM)}
        assert streams == {"UNAVAILABLE": "ops_old", "RESOURCE_EXHAUSTED": "ops_new"}
        for token in (old, kept, new, reader):
            assert token not in child.output and digest(token) not in child.output


async def follow_once(
    events: event_service_pb2_grpc.EventServiceStub,
    subject: str,
    metadata: tuple[tuple[str, str], ...],
) -> None:
    call = events.StreamEvents(
        event_service_pb2.StreamEventsRequest(subject=subject, follow=True), metadata=metadata
    )
    await call.read()


def assert_refused(error: StatusDetails, code: grpc.StatusCode, reason: str) -> None:
    assert error.code == code, error
    assert error.error_info is not None and error.error_info.reason == reason, error


# --------------------------------------------------------------------------
# The listener's certificate
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def caller() -> ClientIdentity:
    return client_identity("rotation-caller")


@pytest.fixture
def generations(tmp_path: Path) -> tuple[Certificates, Certificates]:
    """Two server certificates for 127.0.0.1, each from a CA of its own, so
    a client trusting one CA tells which certificate it was shown."""
    return (
        make_certificates(tmp_path / "first", hosts=("127.0.0.1",)),
        make_certificates(tmp_path / "second", hosts=("127.0.0.1",)),
    )


def volume_files(certs: Certificates, caller: ClientIdentity, key_of: Certificates) -> dict:
    return {
        "tls.crt": certs.server_cert.read_bytes(),
        "tls.key": key_of.server_key.read_bytes(),
        "ca.crt": caller.ca_cert,
    }


def mtls_channel(port: int, trusted: Certificates, caller: ClientIdentity) -> grpc.aio.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=trusted.ca_cert.read_bytes(),
        private_key=caller.key,
        certificate_chain=caller.cert,
    )
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials, options=OWN_CONNECTION)


async def request_stream(
    messages: list[event_service_pb2.UploadEventsRequest], release: asyncio.Event
) -> AsyncIterator[event_service_pb2.UploadEventsRequest]:
    """The first message, then the rest once `release` is set."""
    yield messages[0]
    await release.wait()
    for message in messages[1:]:
        yield message


async def test_certificate_rotates_under_calls_in_flight(
    service_env, login, tmp_path, generations, caller
):
    first, second = generations
    volume = SecretVolume(tmp_path / "listener-tls")
    volume.publish(volume_files(first, caller, key_of=first))
    env = serve_env(service_env, login, grace=5, event_loop=None)
    env.update(
        ORDERSTREAM_TLS_CERT=str(volume.path("tls.crt")),
        ORDERSTREAM_TLS_KEY=str(volume.path("tls.key")),
        ORDERSTREAM_TLS_CLIENT_CA=str(volume.path("ca.crt")),
        # The poll, not SIGHUP, notices the swapped symlink.
        ORDERSTREAM_RELOAD_INTERVAL="0.2",
    )
    subject = unique("rotation-subject")
    async with service_process(env, "serve") as child:
        port = (await child.wait_serving())["port"]
        async with mtls_channel(port, first, caller) as before:
            events = event_service_pb2_grpc.EventServiceStub(before)
            follower = events.StreamEvents(
                event_service_pb2.StreamEventsRequest(subject=subject, follow=True)
            )
            release = asyncio.Event()
            upload_id = unique("rotation-upload")
            upload = events.UploadEvents(
                request_stream(
                    [
                        event_service_pb2.UploadEventsRequest(
                            upload_id=upload_id, events=[event(unique("up"), 1)]
                        ),
                        event_service_pb2.UploadEventsRequest(events=[event(unique("up"), 2)]),
                    ],
                    release,
                )
            )
            await publish(before, subject, 1)
            assert await next_payload(follower) == '{"n": 1}'

            seen = len(child.records)
            volume.publish(volume_files(second, caller, key_of=second))
            reloaded = await child.record("reloaded", after=seen)
            assert reloaded["what"] == "listener certificate"

            # New handshakes see the new certificate.
            async with mtls_channel(port, first, caller) as stale:
                old_trust = await rpc_error(
                    event_service_pb2_grpc.EventServiceStub(stale).PublishEvents(
                        event_service_pb2.PublishEventsRequest(events=[event(subject, 0)]),
                        timeout=5,
                    )
                )
            assert old_trust.code == grpc.StatusCode.UNAVAILABLE, old_trust
            async with mtls_channel(port, second, caller) as after:
                await publish(after, subject, 2)
            # By every acceptor: the kernel spreads new connections over them.
            for _ in range(NEW_CONNECTIONS):
                async with mtls_channel(port, second, caller) as another:
                    await publish(another, unique("rotation-spread"), 0)
            # The calls in flight on the old connection go on and complete.
            assert await next_payload(follower) == '{"n": 2}'
            release.set()
            uploaded = await upload
            assert uploaded.event_count == 2
            await publish(before, subject, 3)
            assert await next_payload(follower) == '{"n": 3}'

            # A key that is not the certificate's: refused, the new pair stays.
            seen = len(child.records)
            volume.publish(volume_files(first, caller, key_of=second))
            refused = await child.record("reload refused", after=seen)
            assert refused["what"] == "listener certificate"
            assert "do not load together" in refused["error"]
            async with mtls_channel(port, second, caller) as still:
                await publish(still, subject, 4)
            assert await next_payload(follower) == '{"n": 4}'
            assert await child.stop(15) == 0

        # The access log names the caller by its certificate's subject.
        callers = {line["caller"] for line in access_lines(child, PUBLISH)}
        assert callers == {"CN=rotation-caller"}
        assert {line["caller"] for line in access_lines(child, UPLOAD)} == {"CN=rotation-caller"}


async def test_sighup_reaches_every_worker(service_env, login, tmp_path):
    """With --workers the parent passes SIGHUP on: each worker reloads."""
    first, second = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    tokens = tmp_path / "tokens"
    tokens.write_bytes(tokens_file(first=(first, "read")))
    env = serve_env(service_env, login, grace=5, event_loop=None)
    env.update(ORDERSTREAM_AUTH_TOKENS_FILE=str(tokens), ORDERSTREAM_RELOAD_INTERVAL="3600")
    async with service_process(env, "serve", "--workers", "2") as child:
        one = await child.record("serving")
        other = await child.record("serving", after=child.records.index(one) + 1)
        tokens.write_bytes(tokens_file(second=(second, "read")))
        reloaded = await reload_by_sighup(child, "reloaded")
        also = await child.record("reloaded", after=child.records.index(reloaded) + 1)
        assert {reloaded["pid"], also["pid"]} == {one["pid"], other["pid"]}
        assert await child.stop(15) == 0
