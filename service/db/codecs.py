"""Timestamps as integer microseconds since the Unix epoch.

The pool's binary codec maps timestamptz to such integers, which convert to
and from google.protobuf.Timestamp with two integer operations instead of
going through `datetime` (this sits on every hot path).
"""

from __future__ import annotations

import asyncpg
from google.protobuf.timestamp_pb2 import Timestamp

# PostgreSQL counts timestamps from 2000-01-01; protobuf from 1970-01-01.
_PG_EPOCH_OFFSET_US = 946_684_800_000_000


async def register_codecs(conn: asyncpg.Connection) -> None:
    """timestamptz <-> integer microseconds since the Unix epoch."""
    await conn.set_type_codec(
        "timestamptz",
        schema="pg_catalog",
        encoder=lambda unix_us: (unix_us - _PG_EPOCH_OFFSET_US,),
        decoder=lambda pg: pg[0] + _PG_EPOCH_OFFSET_US,
        format="tuple",
    )


def timestamp(unix_us: int) -> Timestamp:
    seconds, micros = divmod(unix_us, 1_000_000)
    return Timestamp(seconds=seconds, nanos=micros * 1000)


def unix_micros(ts: Timestamp) -> int:
    """Truncates to PostgreSQL's microsecond resolution."""
    return ts.seconds * 1_000_000 + ts.nanos // 1000
