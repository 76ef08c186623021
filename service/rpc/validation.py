"""Request checks that name the offending field (google.rpc.BadRequest)."""

from __future__ import annotations

from google.protobuf import timestamp_pb2

from service.errors import FieldViolation, invalid_argument

# google.protobuf.Timestamp's valid range: 0001-01-01 to 9999-12-31, UTC.
MIN_TIMESTAMP_SECONDS = -62_135_596_800
MAX_TIMESTAMP_SECONDS = 253_402_300_799
MAX_ID_LENGTH = 128


class Violations:
    """Collects every problem of a request so the caller sees them all at once."""

    __slots__ = ("_found",)

    def __init__(self) -> None:
        self._found: list[FieldViolation] = []

    @property
    def count(self) -> int:
        return len(self._found)

    def add(self, field: str, description: str) -> None:
        self._found.append(FieldViolation(field, description))

    def text(self, field: str, value: str, *, max_length: int, required: bool = True) -> None:
        if not value:
            if required:
                self.add(field, "required")
            return
        if len(value) > max_length:
            self.add(field, f"at most {max_length} characters, got {len(value)}")
        if "\x00" in value:
            self.add(field, "must not contain a NUL character")

    def positive_id(self, field: str, value: int) -> None:
        if value <= 0:
            self.add(field, _not_positive(value))

    def timestamp(self, field: str, value: timestamp_pb2.Timestamp) -> None:
        if not MIN_TIMESTAMP_SECONDS <= value.seconds <= MAX_TIMESTAMP_SECONDS:
            self.add(field, "must lie between 0001-01-01 and 9999-12-31")
        if not 0 <= value.nanos <= 999_999_999:
            self.add(field, "nanos must be from 0 to 999999999")

    def raise_if_any(self) -> None:
        if self._found:
            raise invalid_argument(self._found)


def require_positive_id(field: str, value: int) -> None:
    """For a request whose only field is an id: INVALID_ARGUMENT at once."""
    if value <= 0:
        raise invalid_argument([FieldViolation(field, _not_positive(value))])


def _not_positive(value: int) -> str:
    return f"must be a positive id, got {value}"
