"""Server-stream writes bounded in time: a caller that stops reading (but
keeps its connection, so keepalive cannot tell) must not hold a stream
slot, a pooled connection and an open snapshot for ever.

`await context.write()` is the streams' back-pressure: it returns once gRPC
has room for the message, and blocks (measured with grpcio 1.85) once a few
MiB are buffered for a reader that stopped taking them. `write_within`
bounds that wait. Past it the handler unwinds at once (slot, connection and
transaction come back) and the call ends UNAVAILABLE, reason READER_STALLED,
with RetryInfo and metadata `position`. The status is sent after the
messages already written, the stalled one included (gRPC keeps it), so a
reader that reads on receives all of them and then the status: `position`
is the last id of those messages, the id to resume after. How long the
status waits for that reader is bounded too (`ServiceError.status_wait`).
"""

from __future__ import annotations

import asyncio

import grpc

from service.errors import Reason, ServiceError


async def write_within(
    context: grpc.aio.ServicerContext, message: object, timeout: float, *, position: int
) -> None:
    """Writes `message`, or raises READER_STALLED if the reader has not
    made room for it within `timeout` seconds (ORDERSTREAM_WRITE_STALL_TIMEOUT).
    `position`: the last id `message` carries."""
    try:
        async with asyncio.timeout(timeout):
            await context.write(message)
    except TimeoutError:
        raise reader_stalled(timeout, position) from None


def reader_stalled(timeout: float, position: int) -> ServiceError:
    # UNAVAILABLE, not DEADLINE_EXCEEDED: resuming at once after the last id
    # received is right, as after a lost connection or a shutdown, and the
    # Python client's `stream_events` does so on UNAVAILABLE.
    return ServiceError(
        grpc.StatusCode.UNAVAILABLE,
        Reason.READER_STALLED,
        f"the stream's reader took no message for {timeout:g} s "
        "(ORDERSTREAM_WRITE_STALL_TIMEOUT); resume after the last id received",
        retry_after=1.0,
        metadata={"position": str(position)},
        # The status waits behind the messages for as long as a write would.
        status_wait=timeout,
    )
