"""Gives memory that the process freed back to the system.

A stream's messages are copied into gRPC's C core, which frees them once
the reader has taken them or the connection is gone: a follower that
stalled (ended READER_STALLED) can leave a few MiB behind it, and hundreds
of them hundreds of MiB. glibc's malloc keeps freed memory in its arenas
for reuse, so the process's RSS would stay at its peak for good; calling
`malloc_trim(0)` every so often returns the free pages (measured in
tests/test_fanout.py: 200 stalled followers).

It also keeps the database's TLS reads out of mmap: see
`keep_reads_off_mmap`. Elsewhere than glibc both do nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

INTERVAL = 10.0  # seconds; a trim of a few hundred MiB of arenas takes milliseconds


# Allocations from this size up are mmapped (see keep_reads_off_mmap).
MMAP_THRESHOLD = 1 << 20
_M_MMAP_THRESHOLD = -3  # mallopt's parameter, from glibc's malloc.h


def _libc_function(function: str) -> Any:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    return getattr(ctypes.CDLL(name), function, None)


def keep_reads_off_mmap() -> bool:
    """Serves allocations below MMAP_THRESHOLD from malloc's heap; False
    where that cannot be set (not glibc).

    uvloop reads a TLS connection (the pool's, to PostgreSQL) with
    `SSLObject.read(256 KiB)`: CPython allocates the whole 256 KiB for each
    read and shrinks it to what arrived. glibc mmaps allocations from
    128 KiB up until it has freed a mapped chunk larger than that, and the
    chunks of these reads are shrunk before they are freed, so they never
    raise it: unless something else in the process did, every database
    reply costs an mmap, an mremap and a munmap, and in a process with
    other threads (gRPC's) each unmap makes the kernel flush their TLBs on
    the other cores. The service happened to raise it at start-up (strace
    counts none of these per GetOrder with or without this), but the
    round-trip probe in bench/ did not, and made 2,652-2,736 calls/s
    against 3,506-3,560 with this (docs/benchmarks.md). Set, the threshold
    no longer depends on what ran first. Call once, before any thread or
    worker starts.
    """
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def _malloc_trim() -> Callable[[], None] | None:
    trim = _libc_function("malloc_trim")
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
