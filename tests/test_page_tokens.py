"""Page tokens (service/orders/page_token.py): what they carry, and that
tokens minted before they carried a listing's end still work."""

from __future__ import annotations

import base64
import hashlib
import hmac
import struct

import pytest

from service.orders.page_token import InvalidPageToken, PageTokens
from service.orders.sql import NO_END

KEY = b"k" * 32
FINGERPRINT = b"filters"


def test_a_token_carries_the_last_id_and_the_listings_end():
    tokens = PageTokens(KEY)
    assert tokens.decode(tokens.encode(41, 97, FINGERPRINT), FINGERPRINT) == (41, 97)


def test_a_version_1_token_still_decodes_with_no_end():
    """Version 1 (before the end was carried): a rolling upgrade must not
    break a listing in progress."""
    body = struct.pack(">Bq", 1, 41)
    mac = hmac.digest(KEY, body + FINGERPRINT, hashlib.sha256)[:16]
    token = base64.urlsafe_b64encode(body + mac).rstrip(b"=").decode()
    assert PageTokens(KEY).decode(token, FINGERPRINT) == (41, NO_END)


@pytest.mark.parametrize("token", ["", "AA", "not a token!", "AwAAAAAAAAAp" + "A" * 22])
def test_anything_else_is_refused(token):
    with pytest.raises(InvalidPageToken):
        PageTokens(KEY).decode(token, FINGERPRINT)
