"""Event payloads: a JSON object, given as text or as a Struct, checked here
so that PostgreSQL's jsonb never rejects a row the caller cannot place."""

from __future__ import annotations

import decimal
import json
import re

from google.protobuf import json_format

from orderstream.events.v1 import event_pb2

# The limit of every write path on a payload's size *as PostgreSQL writes it
# out* (what readers receive), in bytes of UTF-8: the same number as the
# events_payload_size CHECK of migration 0004, which enforces it for every
# writer. The checks below catch what they can before the database does.
MAX_PAYLOAD_BYTES = 1 << 20


def written_out_too_large(size: int | None = None) -> str:
    """The violation's description once the database measured the payload."""
    taken = "" if size is None else f"; this one takes {size}"
    return (
        f"at most {MAX_PAYLOAD_BYTES} bytes as PostgreSQL writes it out (every number "
        f"in full, a space after each , and :), which is what readers receive{taken}"
    )


# jsonb keeps numbers as `numeric`, which holds at most 131072 digits before
# the decimal point and 16383 after it; JSON itself has no bound.
_NUMERIC_MAX_WEIGHT = 131_071
_NUMERIC_MAX_SCALE = 16_383


class InvalidPayload(ValueError):
    pass


def _reject_constant(name: str) -> None:
    raise InvalidPayload(f"{name} is not valid JSON")


class _Numbers:
    """json's parse_float for one payload. Refuses numbers that jsonb's
    numeric cannot hold (found by tests/test_hostile_input.py: 1E131100
    reached PostgreSQL), and counts how much longer jsonb writes the others
    out: it stores `1E300` as a numeric and gives it back as 301 digits, so
    a small payload of exponents would come back far larger than it was
    sent (and than any caller can receive)."""

    __slots__ = ("growth",)

    def __init__(self) -> None:
        self.growth = 0

    def __call__(self, text: str) -> float:
        number = decimal.Decimal(text)
        sign, digits, exponent = number.as_tuple()
        assert isinstance(exponent, int)  # the JSON grammar has no NaN or Infinity
        if -exponent > _NUMERIC_MAX_SCALE or (
            number and exponent + len(digits) - 1 > _NUMERIC_MAX_WEIGHT
        ):
            raise InvalidPayload(f"the number {text[:24]} is out of PostgreSQL's numeric range")
        if not number:
            written = 1 if exponent >= 0 else 2 - exponent  # 0, or 0.000...
        elif exponent >= 0:
            written = len(digits) + exponent
        else:
            written = max(1, len(digits) + exponent) + 1 - exponent
        self.growth += max(0, sign + written - len(text))
        return float(number)


def _utf8_size(text: str) -> int:
    # str.isascii() is O(1) in CPython: only non-ASCII text is encoded to
    # learn its size (this runs for every uploaded event).
    return len(text) if text.isascii() else len(text.encode())


def _check_written_out_size(size: int, numbers: _Numbers) -> None:
    if size + numbers.growth > MAX_PAYLOAD_BYTES:
        raise InvalidPayload(
            f"at most {MAX_PAYLOAD_BYTES} bytes of UTF-8 with every number written out "
            f"in full, as PostgreSQL returns it; this one takes {size + numbers.growth}"
        )


def json_object_text(event: event_pb2.Event) -> str:
    """Returns the payload as JSON text for jsonb, or raises InvalidPayload."""
    kind = event.WhichOneof("payload")
    if kind == "json_payload":
        text = event.json_payload
        size = _utf8_size(text)
        if size > MAX_PAYLOAD_BYTES:
            raise InvalidPayload(f"at most {MAX_PAYLOAD_BYTES} bytes of UTF-8")
        numbers = _Numbers()
        try:
            value = json.loads(text, parse_constant=_reject_constant, parse_float=numbers)
        except InvalidPayload:
            raise
        except RecursionError:
            raise InvalidPayload("nested too deeply") from None
        except ValueError as exc:
            raise InvalidPayload(f"not valid JSON: {str(exc)[:200]}") from None
        if not isinstance(value, dict):
            raise InvalidPayload("must be a JSON object")
        if numbers.growth:
            _check_written_out_size(size, numbers)
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
        size = _utf8_size(text)
        if size > MAX_PAYLOAD_BYTES:
            raise InvalidPayload(f"at most {MAX_PAYLOAD_BYTES} bytes of UTF-8")
        # A Struct's numbers are doubles, which json writes as 1e+300; the
        # slow path already, so parse once more to count their digits.
        numbers = _Numbers()
        json.loads(text, parse_float=numbers)
        if numbers.growth:
            _check_written_out_size(size, numbers)
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
