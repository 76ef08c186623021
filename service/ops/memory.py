"""Gives memory that the process freed back to the system.

A stream's messages are copied into gRPC's C core, which frees them once
the reader has taken them or the connection is gone: a follower that
stalled (ended READER_STALLED) can leave a few MiB behind it, and hundreds
of them hundreds of MiB. glibc's malloc keeps freed memory in its arenas
for reuse, so the process's RSS would stay at its peak for good; calling
`malloc_trim(0)` every so often returns the free pages (measured in
tests/test_fanout.py: 200 stalled followers). Elsewhere than glibc this
does nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

INTERVAL = 10.0  # seconds; a trim of a few hundred MiB of arenas takes milliseconds


def _malloc_trim() -> Callable[[], None] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    trim = getattr(ctypes.CDLL(name), "malloc_trim", None)
    if trim is None:
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: trim(0)


async def trim_memory_forever(interval: float = INTERVAL) -> None:
    """Runs until cancelled."""
    trim = _malloc_trim()
    if trim is None:
        log.info("malloc_trim is not available: freed memory stays with the process")
        return
    while True:
        await asyncio.sleep(interval)
        trim()
