"""The channel factory: TLS (optionally mutual), keepalive and the default
service config (timeouts, retries, per-call balancing)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

_ORDERS = "orderstream.orders.v1.OrderService"
_EVENTS = "orderstream.events.v1.EventService"


def _methods(service: str, *names: str) -> list[dict[str, str]]:
    return [{"service": service, "method": name} for name in names]


def _retry(*codes: str) -> dict[str, Any]:
    return {
        "maxAttempts": 4,
        "initialBackoff": "0.1s",
        "maxBackoff": "2s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": list(codes),
    }


#: The service config every channel from `create_channel` starts with.
#:
#: - round_robin: kube-proxy balances connections, not calls; with a headless
#:   Service (a `dns:///` target resolving to every pod) this spreads calls.
#: - Only methods that are idempotent by contract are retried, since a retry
#:   after a lost response repeats a call that may have taken effect:
#:   reads; CreateOrder, ImportOrders and UploadEvents, whose required key
#:   (`request_id`, `import_id`, `upload_id`) makes a repeat return the
#:   first result; UpdateOrderStatus, which can never change an order twice
#:   (no status is entered twice; with a `request_id` a repeat answers the
#:   order). UNAVAILABLE is retried on all of them.
#: - PublishEvents is not retried here: its `request_id` is optional, and a
#:   repeat without one writes the events twice. `publish_events` sets one
#:   and retries on its own.
#: - A durable consumer's calls are idempotent too: AckEvents never moves a
#:   position backwards (a repeat leaves it where the first put it) and
#:   ResetConsumer sets one; the others read.
#: - ABORTED (serialization failure, deadlock) is retried only where a second
#:   attempt cannot write twice and can succeed: reads, CreateOrder and the
#:   consumer calls.
#:   UpdateOrderStatus is not among them: its ABORTED mostly means a stale
#:   `expected_version`, which a blind repeat cannot fix.
#: - Streams get no timeout (an export or a follow stream may run for hours);
#:   pass one per call where a bound is wanted. They retry UNAVAILABLE only:
#:   gRPC can replay a stream only before its first response, which for a
#:   read is before anything could be ABORTED, and a load's ABORTED means
#:   another load with its key is still running, which the caller should
#:   see (`stream_events` resumes and `upload_events` re-sends on their own).
#: - retryThrottling stops retries from piling onto a struggling server.
DEFAULT_SERVICE_CONFIG: dict[str, Any] = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [
        {
            "name": [
                *_methods(_ORDERS, "GetOrder", "ListOrders", "CreateOrder"),
                *_methods(
                    _EVENTS,
                    "GetEvent",
                    "AckEvents",
                    "ListConsumers",
                    "GetConsumer",
                    "ResetConsumer",
                ),
            ],
            "timeout": "10s",
            "retryPolicy": _retry("UNAVAILABLE", "ABORTED"),
        },
        {
            "name": _methods(_ORDERS, "UpdateOrderStatus"),
            "timeout": "10s",
            "retryPolicy": _retry("UNAVAILABLE"),
        },
        {
            "name": _methods(_EVENTS, "PublishEvents"),
            "timeout": "10s",
        },
        {
            "name": [
                *_methods(_ORDERS, "ExportOrders", "ImportOrders"),
                *_methods(_EVENTS, "UploadEvents", "StreamEvents"),
            ],
            "retryPolicy": _retry("UNAVAILABLE"),
        },
    ],
    "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1},
}


def keepalive_options(*, time_ms: int = 300_000, timeout_ms: int = 20_000) -> list[tuple[str, int]]:
    """Channel options that detect a silently dropped connection.

    Behind Kubernetes a connection can vanish without a FIN (a node or a
    conntrack entry goes away); a ping every `time_ms` while calls are open
    notices within `time_ms + timeout_ms`, so quiet follow streams fail over
    instead of hanging. The default equals grpc servers' default minimum ping
    interval (5 minutes): pinging more often makes a server that was not
    configured for it close the connection with "too_many_pings".

        # The server allows pings every 30 s (grpc.http2.min_ping_interval_without_data_ms):
        channel = create_channel(target, options=keepalive_options(time_ms=30_000))
    """
    return [
        ("grpc.keepalive_time_ms", time_ms),
        ("grpc.keepalive_timeout_ms", timeout_ms),
        # Pings only while calls are open: an idle channel reconnects on demand.
        ("grpc.keepalive_permit_without_calls", 0),
        # A follow stream may carry no data for a long time; keep pinging it.
        ("grpc.http2.max_pings_without_data", 0),
    ]


def create_channel(
    target: str,
    *,
    ca_file: str | Path | None = None,
    client_cert_file: str | Path | None = None,
    client_key_file: str | Path | None = None,
    insecure: bool = False,
    token: str | None = None,
    service_config: dict[str, Any] | None = None,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.aio.Channel:
    """Opens a channel to orderstream.

    TLS verifies the server with `ca_file` (the system roots when None);
    `client_cert_file` and `client_key_file` together add a client
    certificate for mTLS. `insecure=True` speaks plain text, for `make run`
    and tests only. `token` is sent with every call as `authorization:
    Bearer <token>` (for a server with ORDERSTREAM_AUTH_TOKENS_FILE); gRPC
    sends it over TLS only, so it cannot go with `insecure=True`.
    `service_config` replaces `DEFAULT_SERVICE_CONFIG`; `options` are
    appended to (and so override) the keepalive defaults.

        channel = create_channel("dns:///orderstream:50051", ca_file="/etc/ca.crt")
        order = await OrderServiceStub(channel).GetOrder(GetOrderRequest(id=1))
    """
    if (client_cert_file is None) != (client_key_file is None):
        raise ValueError("create_channel: client_cert_file and client_key_file go together")
    if insecure and (ca_file or client_cert_file):
        raise ValueError("create_channel: insecure=True takes no certificates")
    if insecure and token is not None:
        raise ValueError("create_channel: a token is sent over TLS only, not with insecure=True")
    config = DEFAULT_SERVICE_CONFIG if service_config is None else service_config
    channel_options = [
        ("grpc.service_config", json.dumps(config)),
        ("grpc.enable_retries", 1),
        *keepalive_options(),
        *options,
    ]
    if insecure:
        return grpc.aio.insecure_channel(target, options=channel_options)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read(ca_file),
        private_key=_read(client_key_file),
        certificate_chain=_read(client_cert_file),
    )
    if token is not None:
        credentials = grpc.composite_channel_credentials(
            credentials, grpc.access_token_call_credentials(token)
        )
    return grpc.aio.secure_channel(target, credentials, options=channel_options)


def _read(path: str | Path | None) -> bytes | None:
    return None if path is None else Path(path).read_bytes()
