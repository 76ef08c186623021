"""service/ops/memory.py's keep_reads_off_mmap: allocations the size of
uvloop's TLS reads (256 KiB, made and shrunk for every database reply) come
from malloc's heap, not from a new mapping each (glibc; the suite runs on
Debian)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from service.ops.memory import MMAP_THRESHOLD

# In a fresh interpreter: how many regions malloc has mapped (mallinfo2's
# hblks) while a reply-sized buffer is alive, with or without the setting.
PROBE = """
import ctypes, json, sys
from service.ops import memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
        "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
applied = memory.keep_reads_off_mmap() if sys.argv[1] == "set" else None
before = libc.mallinfo2().hblks
buffer = bytes(256 * 1024 + 1)
during = libc.mallinfo2().hblks
print(json.dumps({"applied": applied, "mapped": during - before}))
"""


def probe(mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True
    ).stdout
    return dict(json.loads(out))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_reply_sized_allocations_are_not_mapped_one_by_one():
    assert probe("default")["mapped"] == 1  # what every database reply cost
    kept = probe("set")
    assert kept == {"applied": True, "mapped": 0}
    assert MMAP_THRESHOLD > 256 * 1024
