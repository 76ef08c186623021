"""Opaque, tamper-evident page tokens for keyset pagination.

A token carries the last id of the page it ends, the last id the listing
reads (the end of its creation-time window, found on its first page:
sql.window_ids) and a MAC over both and a fingerprint of the query's
filters, so a token that was edited, or that comes from a query with other
filters, is rejected rather than silently giving a wrong page. Tokens of
version 1, from before the end was carried, still decode, unbounded. The
key comes from ORDERSTREAM_PAGE_TOKEN_KEY; every replica must share it for
tokens to work across replicas and restarts.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import struct

_VERSION = 2
_LAYOUTS = {
    1: struct.Struct(">Bq"),  # version, last id
    2: struct.Struct(">Bqq"),  # version, last id, last id to read
}
_MAC_BYTES = 16
# What a version 1 token's listing reads to: the largest bigint (sql.NO_END).
_UNBOUNDED = 2**63 - 1


class InvalidPageToken(ValueError):
    pass


class PageTokens:
    def __init__(self, key: bytes) -> None:
        self._key = key

    def _mac(self, body: bytes, fingerprint: bytes) -> bytes:
        return hmac.digest(self._key, body + fingerprint, hashlib.sha256)[:_MAC_BYTES]

    def encode(self, last_id: int, end_id: int, fingerprint: bytes) -> str:
        body = _LAYOUTS[_VERSION].pack(_VERSION, last_id, end_id)
        raw = body + self._mac(body, fingerprint)
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")

    def decode(self, token: str, fingerprint: bytes) -> tuple[int, int]:
        """Returns the last id and the last id to read; raises
        InvalidPageToken for anything not minted here."""
        try:
            padded = (token + "=" * (-len(token) % 4)).encode("ascii")
            raw = base64.b64decode(padded, altchars=b"-_", validate=True)
        except (binascii.Error, ValueError):
            raise InvalidPageToken("not a page token") from None
        layout = _LAYOUTS.get(raw[0]) if raw else None
        if layout is None or len(raw) != layout.size + _MAC_BYTES:
            raise InvalidPageToken("not a page token")
        body, mac = raw[: layout.size], raw[layout.size :]
        if not hmac.compare_digest(mac, self._mac(body, fingerprint)):
            raise InvalidPageToken("page token was altered or belongs to a different query")
        _version, last_id, *end = layout.unpack(body)
        return int(last_id), int(end[0]) if end else _UNBOUNDED
