"""The one place a handler's exception becomes a gRPC status: every
handler is wrapped by `rpc`."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from service.rpc import refusals
from service.rpc.registry import Undecodable
from service.rpc.status_map import abort, from_exception

Request = TypeVar("Request")
Response = TypeVar("Response")
Handler = Callable[[Any, Request, grpc.aio.ServicerContext], Awaitable[Response]]


def rpc(method: Handler[Request, Response]) -> Handler[Request, Response]:
    """Turns any exception of a handler into a gRPC status with details.

    Every handler is a coroutine: server-streaming ones `await
    context.write()` (the back-pressure) instead of yielding, so a cancelled
    call unwinds through ordinary awaits and `finally` blocks.

    CancelledError is a BaseException and passes through untouched: the call
    is gone, and swallowing it leaks (grpc #43360).
    """
    name = method.__name__

    @functools.wraps(method)
    async def handle(self: Any, request: Request, context: grpc.aio.ServicerContext) -> Response:
        try:
            if request.__class__ is Undecodable:  # see service/rpc/registry.py
                raise request.error("request")  # type: ignore[attr-defined]
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            if context.cancelled() or isinstance(exc, grpc.aio.InternalError):
                # The caller is gone (cancel, deadline, broken connection):
                # what failed was a write to it, no status can reach it, and
                # it is no INTERNAL error of ours. End as the cancellation
                # it is. grpc.aio's InternalError (ExecuteBatchError) is a
                # write or read the call refused: it can arrive before
                # grpc.aio has noticed the cancel, with cancelled() still
                # False (seen once in the 1,000-cancels fault scenario).
                raise asyncio.CancelledError("the call was cancelled") from None
            error = from_exception(exc, name)
            refusals.note(error)
            await abort(context, error)
            raise AssertionError("unreachable: abort raises") from None

    return handle
