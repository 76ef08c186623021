# The C extension built from wire.c (see there).
from collections.abc import Mapping, Sequence
from typing import Any

def encode_order(row: Sequence[Any], statuses: Mapping[str, int]) -> bytes: ...
def encode_page(
    rows: Sequence[Sequence[Any]], count: int, statuses: Mapping[str, int], next_page_token: str
) -> bytes: ...
def encode_orders(
    rows: Sequence[Sequence[Any]],
    start: int,
    used: int,
    budget: int,
    statuses: Mapping[str, int],
) -> tuple[bytes, int]: ...
