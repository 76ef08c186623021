"""A pytest plugin that counts the fault suite's figures for docs/reliability.md:
scenarios run and survived, and the ledger's totals, printed as one line in
pytest's terminal summary. Registered from tests/conftest.py.

A scenario is a test that uses the `scenario` fixture; it survived when its
setup, body and teardown (where the invariants are checked) all passed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from tests.faults.ledger import Totals


@dataclass
class Tally:
    scenarios: set[str] = field(default_factory=set)
    finished: set[str] = field(default_factory=set)
    failed: set[str] = field(default_factory=set)
    totals: Totals = field(default_factory=Totals)
    # Figures a scenario measured (the failover's unavailability window).
    notes: list[str] = field(default_factory=list)

    def line(self) -> str:
        t = self.totals
        survived = len(self.finished - self.failed)
        return (
            f"fault suite: {survived} of {len(self.finished)} scenarios survived; "
            f"writes acknowledged {t.acknowledged}, found exactly once {t.found_once}; "
            f"failed {t.failed}, absent {t.failed_absent}; "
            f"unknown {t.unknown}, resolved and found exactly once {t.unknown_resolved}"
        )


TALLY = Tally()


def pytest_runtest_setup(item: pytest.Item) -> None:
    if "scenario" in getattr(item, "fixturenames", ()):
        TALLY.scenarios.add(item.nodeid)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.nodeid not in TALLY.scenarios:
        return
    if report.skipped:
        TALLY.scenarios.discard(report.nodeid)
        return
    if report.failed:
        TALLY.failed.add(report.nodeid)
    if report.when == "teardown":
        TALLY.finished.add(report.nodeid)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if TALLY.finished:
        terminalreporter.write_line(TALLY.line())
    for note in TALLY.notes:
        terminalreporter.write_line(note)
