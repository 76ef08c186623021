"""Requests that do not parse get INVALID_ARGUMENT, not gRPC's UNKNOWN.

grpc.aio answers a request message its deserializer cannot parse (corrupt
bytes, or nesting deeper than protobuf's limit of 100, e.g. a deep Struct
payload) with UNKNOWN and the parser's text (found by
tests/test_hostile_input.py). The services are registered here instead of
through the generated add_*Servicer_to_server, with deserializers that put
an `Undecodable` in the message's place: `boundary.rpc` turns one that arrives
as a unary request into INVALID_ARGUMENT, and `_decoded` one that arrives
in a request stream, naming the message (`messages[3]`).

The same deserializers refuse a message over ORDERSTREAM_MAX_MESSAGE_BYTES
with RESOURCE_EXHAUSTED naming the message and the limit: gRPC's own check
would answer without any details. gRPC's own limit is set to twice ours
(service/app.py), so it still refuses, unread, what is far too large.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import DecodeError

from service.errors import FieldViolation, Reason, ServiceError, invalid_argument
from service.rpc import encoded


class Undecodable:
    """Stands in for a request message that did not parse, or that is over
    the size limit: `error` says which, for the field that held it."""

    __slots__ = ("_error",)

    def __init__(self, error: Callable[[str], ServiceError]) -> None:
        self._error = error

    def error(self, field: str) -> ServiceError:
        return self._error(field)


def _tolerant(method: MethodDescriptor, max_bytes: int) -> Callable[[bytes], Any]:
    parse = message_factory.GetMessageClass(method.input_type).FromString
    type_name = method.input_type.full_name

    def deserialize(data: bytes) -> Any:
        if len(data) > max_bytes:
            size = len(data)
            return Undecodable(lambda field: _too_large(field, size, max_bytes))
        try:
            return parse(data)
        except DecodeError as exc:
            reason = str(exc).rpartition(": ")[2]
            return Undecodable(
                lambda field: invalid_argument(
                    [FieldViolation(field, f"not a valid {type_name} message: {reason}"[:240])]
                )
            )

    return deserialize


def _too_large(field: str, size: int, max_bytes: int) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        Reason.MESSAGE_TOO_LARGE,
        f"a request message may hold at most {max_bytes} bytes; this one holds {size}",
        [FieldViolation(field, f"{size} bytes, over the limit of {max_bytes}")],
        metadata={"max_bytes": str(max_bytes)},
    )


async def _decoded(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    index = 0
    async for message in requests:
        if message.__class__ is Undecodable:
            raise message.error(f"messages[{index}]")
        index += 1
        yield message


def _checking_stream(behavior: Callable[..., Any]) -> Callable[..., Any]:
    async def handle(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
        return await behavior(_decoded(requests), context)

    return handle


# (request streaming, response streaming) -> grpc's handler factory.
HANDLER_KINDS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def generic_handler(
    servicer: Any, service: ServiceDescriptor, *, max_message_bytes: int
) -> grpc.GenericRpcHandler:
    """`servicer`'s methods of `service` as one generic handler, with tolerant
    deserializers, built once and added to every acceptor. Generic only,
    never registered per method: see `GenericOnly`."""
    handlers = {}
    for method in service.methods:
        behavior = getattr(servicer, method.name)
        if method.client_streaming:
            behavior = _checking_stream(behavior)
        kind = HANDLER_KINDS[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = kind(
            behavior,
            request_deserializer=_tolerant(method, max_message_bytes),
            response_serializer=encoded.serializer(
                method, message_factory.GetMessageClass(method.output_type)
            ),
        )
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


class GenericOnly:
    """Stands in for a grpc.aio server when the generated
    add_*Servicer_to_server functions (health, reflection) register their
    handlers, so that they too are served through generic handlers only.

    A grpc.aio server (grpcio 1.85) keeps one request with gRPC core open
    for every registered method, plus one for the rest, and after each call
    that arrives it waits again on all of them (`asyncio.wait`, a callback
    added to and removed from each). With the 18 methods served here
    (orders, events, health, reflection) that is 19 requests, and the wait
    took about 7% of the event loop under GetOrder load. Served
    generically, each acceptor keeps a single request open; a call's
    handler is then found by one dict lookup per service
    (docs/benchmarks.md#generic-handlers). gRPC orders no concurrent calls
    either way, so nothing a caller may rely on changes.

    Those functions register both ways; this keeps only the generic half.
    """

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service_name: str, handlers: Any) -> None:
        """Left out on purpose (see the class)."""
