"""OpenTelemetry spans for RPCs and their queries, configured by the standard
OTEL_* variables and off unless they ask for an exporter.

Tracing is on when `OTEL_TRACES_EXPORTER` names an exporter (`otlp`,
`console`, ...) or an OTLP endpoint is set, and `OTEL_SDK_DISABLED` is not
true. The SDK itself reads the rest (`OTEL_SERVICE_NAME`,
`OTEL_RESOURCE_ATTRIBUTES`, `OTEL_EXPORTER_OTLP_*`, `OTEL_BSP_*`,
`OTEL_TRACES_SAMPLER`). It is built per server, after any fork, because the
OTLP exporter owns a gRPC channel.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

from service.errors import StartupError

# The SDK's own short names for the OTLP exporters.
_EXPORTER_ALIASES = {"otlp": "otlp_proto_grpc"}


def _enabled(environ: Mapping[str, str]) -> str | None:
    """The exporter's name when tracing is on, else None."""
    if environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    exporter = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter:
        return None if exporter == "none" else exporter
    endpoints = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    return "otlp" if any(environ.get(name) for name in endpoints) else None


def _exporter(name: str) -> SpanExporter:
    wanted = _EXPORTER_ALIASES.get(name, name)
    for entry in entry_points(group="opentelemetry_traces_exporter"):
        if entry.name == wanted:
            return entry.load()()  # type: ignore[no-any-return]
    raise StartupError(f"OTEL_TRACES_EXPORTER={name} is not an installed span exporter")


@dataclass
class _Span:
    span: trace.Span
    token: object


class Tracing:
    def __init__(self, provider: TracerProvider) -> None:
        self._provider = provider
        self._tracer = provider.get_tracer("orderstream")
        self._asyncpg = AsyncPGInstrumentor()

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Tracing | None:
        name = _enabled(environ)
        if name is None:
            return None
        if len(name.split(",")) > 1:
            raise StartupError("OTEL_TRACES_EXPORTER: only one exporter is supported")
        resource = Resource.create(
            {} if environ.get("OTEL_SERVICE_NAME") else {"service.name": "orderstream"}
        )
        provider = TracerProvider(resource=resource)
        provider.add_span_processor(BatchSpanProcessor(_exporter(name)))
        return cls(provider)

    def start(self) -> None:
        # asyncpg's instrumentation patches the Connection class for the whole
        # process; query spans become children of the current RPC's span.
        self._asyncpg.instrument(tracer_provider=self._provider)

    def shutdown(self) -> None:
        self._asyncpg.uninstrument()
        self._provider.shutdown()  # flushes the spans still queued

    def start_rpc(self, method: str, context: grpc.aio.ServicerContext) -> _Span:
        carrier = dict(context.invocation_metadata() or ())
        parent = propagate.extract(carrier)
        service, _, name = method.lstrip("/").partition("/")
        span = self._tracer.start_span(
            method.lstrip("/"),
            context=parent,
            kind=trace.SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
        )
        token = otel_context.attach(trace.set_span_in_context(span))
        return _Span(span, token)

    def end_rpc(self, call: Any, code: str) -> None:
        call.span.set_attribute("rpc.grpc.status_code", grpc.StatusCode[code].value[0])
        if code != "OK":
            call.span.set_status(trace.Status(trace.StatusCode.ERROR, code))
        call.span.end()
        otel_context.detach(call.token)
