# The C extension built from wire.c (see there).
from collections.abc import Sequence
from typing import Any

def encode_events(
    rows: Sequence[Sequence[Any]], start: int, used: int, budget: int
) -> tuple[bytes, int]: ...
