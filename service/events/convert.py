"""Event rows to protobuf messages."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from orderstream.events.v1 import event_pb2
from service.db.codecs import timestamp


def event_from_row(row: Mapping[str, Any]) -> event_pb2.Event:
    """A row of sql.EVENT_COLUMNS: a payload over the limit is NULL and
    leaves json_payload unset for omitted_payload_bytes (as wire.c does)."""
    event = event_pb2.Event(
        id=row["id"],
        type=row["type"],
        source=row["source"],
        subject=row["subject"],
        time=timestamp(row["time"]),
    )
    if row["payload"] is None:
        event.omitted_payload_bytes = row["payload_bytes"]
    else:
        event.json_payload = row["payload"]
    return event
