"""Client certificates as callers: which certificate identity holds which
scopes, over mTLS.

The identities file (ORDERSTREAM_AUTH_CERT_IDENTITIES_FILE, a mounted
Secret or ConfigMap) holds one line per caller: a name for the logs, its
scopes, and the certificate identity, which is the rest of the line (a
subject may hold spaces):

    # name     scopes       identity
    billing    read,write   uri:spiffe://prod/ns/billing/sa/billing
    reporting  read         dns:reporting.internal
    ledger     write        subject:CN=ledger,O=Example Corp

`subject:` is the certificate's subject as RFC 2253 prints it
(`openssl x509 -noout -subject -nameopt RFC2253`), `dns:`, `uri:` and
`email:` one of its subject alternative names. Between the scopes and the
identity a line may limit the events its caller writes, as a tokens-file
line does (service/rpc/write_limits.py):

    billing    write  types=billing.* sources=/billing  uri:spiffe://prod/ns/billing/sa/billing

A limit starts with `types=` or `sources=`, an identity with its kind, so
the two cannot be confused. A certificate is the caller
of the first line it matches. A call that carries no token is checked
against its connection's certificate here; a grpc.aio interceptor cannot
see the peer's certificate, so the check runs inside the handler, before
the handler's own code and before the request stream is read.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from service.errors import StartupError
from service.rpc import caller_files, write_limits
from service.rpc.registry import HANDLER_KINDS

SETTING = "ORDERSTREAM_AUTH_CERT_IDENTITIES_FILE"
# identity kind -> the key of grpc's auth context that holds its values.
KINDS = {
    "subject": "x509_subject",
    "dns": "peer_dns",
    "uri": "peer_uri",
    "email": "peer_email",
}


# How a line's limit fields start (an identity starts with its kind).
_LIMIT_PREFIXES = tuple(f"{field}=" for field in write_limits.FIELDS)


@dataclass(frozen=True)
class CertificateCaller:
    """One line of the identities file."""

    name: str
    kind: str
    identity: str
    scopes: frozenset[str]
    limits: write_limits.WriteLimits | None = None


class CertificateIdentities:
    """The identities file's table, immutable: a changed file is a new table
    (service/ops/reloading.py swaps it whole)."""

    def __init__(self, callers: Sequence[CertificateCaller]) -> None:
        self._callers = tuple(callers)

    @classmethod
    def parse(cls, data: bytes, path: Path, known_scopes: Sequence[str]) -> CertificateIdentities:
        """Errors name the file and line."""
        callers = [
            _caller(content, known_scopes, where)
            for where, content in caller_files.lines(data, SETTING, path, listing="identity")
        ]
        identities = [(caller.kind, caller.identity) for caller in callers]
        if len(set(identities)) != len(identities):
            raise StartupError(f"{SETTING} {path} lists an identity twice")
        return cls(callers)

    def find(self, auth_context: Mapping[str, Sequence[bytes]]) -> CertificateCaller | None:
        """The caller whose identity the connection's certificate carries."""
        for caller in self._callers:
            values = auth_context.get(KINDS[caller.kind], ())
            if any(value.decode(errors="replace") == caller.identity for value in values):
                return caller
        return None


def read_identities_file(path: Path) -> bytes:
    return caller_files.read(SETTING, path)


def _caller(content: str, known_scopes: Sequence[str], where: str) -> CertificateCaller:
    fields = content.split(None, 2)
    if len(fields) != 3:
        raise StartupError(f"{where}: expected 'NAME SCOPES KIND:IDENTITY'")
    name, scopes, identity = fields
    if not caller_files.NAME.fullmatch(name):
        raise StartupError(f"{where}: {caller_files.NAME_RULE}")
    limit_fields: list[str] = []
    while identity.startswith(_LIMIT_PREFIXES):
        field, *rest = identity.split(None, 1)
        limit_fields.append(field)
        identity = rest[0] if rest else ""
    try:
        limits = write_limits.parse(name, limit_fields)
    except ValueError as exc:
        raise StartupError(f"{where}: {exc}") from None
    kind, colon, value = identity.partition(":")
    if not colon or kind not in KINDS or not value:
        raise StartupError(
            f"{where}: the identity must be one of {', '.join(k + ':...' for k in KINDS)}"
        )
    granted = frozenset(scopes.split(","))
    if not granted <= set(known_scopes):
        raise StartupError(
            f"{where}: scopes must be a comma-separated list of: {', '.join(known_scopes)}"
        )
    return CertificateCaller(name, kind, value.strip(), granted, limits)


Check = Callable[[grpc.aio.ServicerContext], Awaitable[None]]


def checked_at_call(handler: grpc.RpcMethodHandler, check: Check) -> grpc.RpcMethodHandler:
    """`handler`, of the same kind, with `check(context)` awaited before its
    behaviour runs: what only the call's context shows (the peer's
    certificate) can refuse it there."""
    behavior = (
        handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    )
    if inspect.isasyncgenfunction(behavior):

        async def checked_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await check(context)
            async for response in behavior(request, context):
                yield response

        checked: Callable[..., Any] = checked_stream
    else:

        async def checked_call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await check(context)
            return await behavior(request, context)

        checked = checked_call
    return HANDLER_KINDS[(handler.request_streaming, handler.response_streaming)](
        checked,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
