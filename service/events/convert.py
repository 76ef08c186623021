"""Event rows to protobuf messages."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from orderstream.events.v1 import event_pb2
from service.db.codecs import timestamp


def event_from_row(row: Mapping[str, Any]) -> event_pb2.Event:
    return event_pb2.Event(
        id=row["id"],
        type=row["type"],
        source=row["source"],
        subject=row["subject"],
        time=timestamp(row["time"]),
        json_payload=row["payload"],
    )
