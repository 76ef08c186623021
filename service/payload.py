"""Event payloads: a JSON object, given as text or as a Struct, checked here
so that PostgreSQL's jsonb never rejects a row the caller cannot place."""

from __future__ import annotations

import decimal
import json
import re

from google.protobuf import json_format

from orderstream.events.v1 import event_pb2

MAX_PAYLOAD_BYTES = 1 << 20
# jsonb keeps numbers as `numeric`, which holds at most 131072 digits before
# the decimal point and 16383 after it; JSON itself has no bound.
_NUMERIC_MAX_WEIGHT = 131_071
_NUMERIC_MAX_SCALE = 16_383


class InvalidPayload(ValueError):
    pass


def _reject_constant(name: str) -> None:
    raise InvalidPayload(f"{name} is not valid JSON")


def _numeric_compatible(text: str) -> float:
    """json's parse_float: refuses numbers that jsonb's numeric cannot hold
    (found by tests/test_hostile_input.py: 1E131100 reached PostgreSQL)."""
    number = decimal.Decimal(text)
    _, digits, exponent = number.as_tuple()
    assert isinstance(exponent, int)  # the JSON grammar has no NaN or Infinity
    if -exponent > _NUMERIC_MAX_SCALE or (
        number and exponent + len(digits) - 1 > _NUMERIC_MAX_WEIGHT
    ):
        raise InvalidPayload(f"the number {text[:24]} is out of PostgreSQL's numeric range")
    return float(number)


def _utf8_size(text: str) -> int:
    # str.isascii() is O(1) in CPython: only non-ASCII text is encoded to
    # learn its size (this runs for every uploaded event).
    return len(text) if text.isascii() else len(text.encode())


def json_object_text(event: event_pb2.Event) -> str:
    """Returns the payload as JSON text for jsonb, or raises InvalidPayload."""
    kind = event.WhichOneof("payload")
    if kind == "json_payload":
        text = event.json_payload
        if _utf8_size(text) > MAX_PAYLOAD_BYTES:
            raise InvalidPayload(f"at most {MAX_PAYLOAD_BYTES} bytes of UTF-8")
        try:
            value = json.loads(
                text, parse_constant=_reject_constant, parse_float=_numeric_compatible
            )
        except InvalidPayload:
            raise
        except RecursionError:
            raise InvalidPayload("nested too deeply") from None
        except ValueError as exc:
            raise InvalidPayload(f"not valid JSON: {str(exc)[:200]}") from None
        if not isinstance(value, dict):
            raise InvalidPayload("must be a JSON object")
        _check_jsonb_compatible(text, value)
        return text
    if kind == "struct_payload":
        try:
            value = json_format.MessageToDict(event.struct_payload)
            text = json.dumps(value, ensure_ascii=False, allow_nan=False)
        except RecursionError:
            raise InvalidPayload("nested too deeply") from None
        except ValueError:
            raise InvalidPayload("numbers must be finite") from None
        if _utf8_size(text) > MAX_PAYLOAD_BYTES:
            raise InvalidPayload(f"at most {MAX_PAYLOAD_BYTES} bytes of UTF-8")
        _check_jsonb_compatible(text, value)
        return text
    raise InvalidPayload("required: a JSON object in json_payload or struct_payload")


# JSON text holds NUL only as the escape \u0000 (raw control characters are
# invalid JSON), preceded by an even run of backslashes (an odd run would
# make it a literal backslash followed by "u0000").
_NUL_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _check_jsonb_compatible(text: str, value: object) -> None:
    """jsonb refuses \\u0000 and unpaired surrogates, which JSON itself allows."""
    if _NUL_ESCAPE.search(text):
        raise InvalidPayload("must not contain a NUL character (\\u0000)")
    if _SURROGATE_ESCAPE.search(text):
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidPayload("must not contain unpaired UTF-16 surrogates") from None
