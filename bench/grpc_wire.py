"""gRPC's wire framing, so h2load can send a real request body.

A gRPC message on HTTP/2 is a 5-byte prefix (a compressed flag and the
big-endian length) followed by the serialised protobuf; h2load sends a file
verbatim as each request's DATA, so the file holds exactly one such frame.
"""

from __future__ import annotations

import struct
from pathlib import Path

from google.protobuf.message import Message

# The headers every gRPC request carries besides :method/:path.
REQUEST_HEADERS = ("content-type: application/grpc", "te: trailers")


def frame(message: Message) -> bytes:
    body = message.SerializeToString()
    return struct.pack(">BI", 0, len(body)) + body


def write_frame(message: Message, path: Path) -> Path:
    path.write_bytes(frame(message))
    return path
