"""Counts the hostile inputs the property tests send, per RPC and outcome,
and prints one line in pytest's terminal summary, e.g.

    hostile inputs: 1234 calls across 10 RPCs, 0 INTERNAL

so docs/security.md can report what a run tried. Registered from tests/conftest.py.
"""

from __future__ import annotations

from collections import Counter

import pytest

# (rpc, status code name) -> calls made.
_calls: Counter[tuple[str, str]] = Counter()
# Codes that mean the service failed rather than judged the input.
FAILURE_CODES = ("INTERNAL", "UNKNOWN")


def record(rpc: str, code: str) -> None:
    _calls[(rpc, code)] += 1


def summary() -> str | None:
    if not _calls:
        return None
    total = sum(_calls.values())
    rpcs = len({rpc for rpc, _ in _calls})
    failures = sum(n for (_, code), n in _calls.items() if code in FAILURE_CODES)
    by_code = Counter[str]()
    for (_, code), n in _calls.items():
        by_code[code] += n
    codes = ", ".join(f"{code} {n}" for code, n in sorted(by_code.items()))
    return f"hostile inputs: {total} calls across {rpcs} RPCs, {failures} INTERNAL ({codes})"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    line = summary()
    if line is not None:
        terminalreporter.write_line(line)
