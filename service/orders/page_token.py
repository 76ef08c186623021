"""Opaque, tamper-evident page tokens for keyset pagination.

A token carries the last id of the page it ends and a MAC over that id and a
fingerprint of the query's filters, so a token that was edited, or that comes
from a query with other filters, is rejected rather than silently giving a
wrong page. The key comes from ORDERSTREAM_PAGE_TOKEN_KEY; every replica must
share it for tokens to work across replicas and restarts.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import struct

_VERSION = 1
_LAYOUT = struct.Struct(">Bq")  # version, last id
_MAC_BYTES = 16


class InvalidPageToken(ValueError):
    pass


class PageTokens:
    def __init__(self, key: bytes) -> None:
        self._key = key

    def _mac(self, body: bytes, fingerprint: bytes) -> bytes:
        return hmac.digest(self._key, body + fingerprint, hashlib.sha256)[:_MAC_BYTES]

    def encode(self, last_id: int, fingerprint: bytes) -> str:
        body = _LAYOUT.pack(_VERSION, last_id)
        raw = body + self._mac(body, fingerprint)
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")

    def decode(self, token: str, fingerprint: bytes) -> int:
        """Returns the last id; raises InvalidPageToken for anything not minted here."""
        try:
            padded = (token + "=" * (-len(token) % 4)).encode("ascii")
            raw = base64.b64decode(padded, altchars=b"-_", validate=True)
        except (binascii.Error, ValueError):
            raise InvalidPageToken("not a page token") from None
        if len(raw) != _LAYOUT.size + _MAC_BYTES:
            raise InvalidPageToken("not a page token")
        body, mac = raw[: _LAYOUT.size], raw[_LAYOUT.size :]
        if not hmac.compare_digest(mac, self._mac(body, fingerprint)):
            raise InvalidPageToken("page token was altered or belongs to a different query")
        version, last_id = _LAYOUT.unpack(body)
        if version != _VERSION:
            raise InvalidPageToken("page token from an unsupported version")
        return int(last_id)
