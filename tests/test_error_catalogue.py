"""docs/api.md lists exactly the reasons the service sends: the members of
`Reason`, each once, in the one table of its `## Error reasons` section."""

from __future__ import annotations

import re
from pathlib import Path

from service.errors import Reason

API_DOC = Path(__file__).resolve().parent.parent / "docs" / "api.md"
_REASON_CELL = re.compile(r"\|\s*`([A-Z][A-Z0-9_]*)`\s*\|")


def documented_reasons(text: str) -> list[str]:
    """The first column of the table in the `## Error reasons` section, in order."""
    sections = re.split(r"^## ", text, flags=re.MULTILINE)
    (section,) = [s for s in sections if s.split("\n", 1)[0].strip() == "Error reasons"]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    _header, rule, *body = rows
    assert re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", rule.replace(" ", "")), rule
    reasons = []
    for row in body:
        cell = _REASON_CELL.match(row)
        assert cell is not None, f"not a reason in backticks: {row}"
        reasons.append(cell[1])
    return reasons


def test_the_documented_reasons_are_exactly_the_catalogue():
    documented = documented_reasons(API_DOC.read_text(encoding="utf-8"))
    repeated = sorted({r for r in documented if documented.count(r) > 1})
    assert not repeated, f"listed more than once: {repeated}"
    assert set(documented) == {r.value for r in Reason}


def test_reason_values_are_their_names():
    """The value is the wire string; a member whose value differs from its
    name would let code and docs disagree on what a caller sees."""
    assert [r.name for r in Reason] == [r.value for r in Reason]
