"""Hand-written helpers over the generated stubs: a channel with sensible
defaults, writes that always carry an idempotency key, batched idempotent
uploads, resumable event streams and durable consumers.

    import asyncio
    from orderstream.client import create_channel, stream_events

    async def main() -> None:
        async with create_channel("orders.internal:50051", ca_file="ca.crt") as channel:
            async for event in stream_events(channel, subject="orders/42"):
                print(event.id, event.type)

    asyncio.run(main())

Everything generated lives in `orderstream.orders` and `orderstream.events`;
this package only imports from there.
"""

from orderstream.client._channel import DEFAULT_SERVICE_CONFIG, create_channel, keepalive_options
from orderstream.client._consumers import consume_events
from orderstream.client._streams import stream_events
from orderstream.client._uploads import DEFAULT_BATCH_BYTES, upload_events, upload_requests
from orderstream.client._writes import create_order, publish_events, update_order_status

__all__ = [
    "DEFAULT_BATCH_BYTES",
    "DEFAULT_SERVICE_CONFIG",
    "consume_events",
    "create_channel",
    "create_order",
    "keepalive_options",
    "publish_events",
    "stream_events",
    "update_order_status",
    "upload_events",
    "upload_requests",
]
