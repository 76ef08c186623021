"""The documentation stays in the repository and stays short where it must:
README.md within 200 lines, every relative link in README.md and docs/
resolving to a file of the repository, and nothing pointing outside it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from urllib.parse import unquote

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

# [text](target) and ![alt](target); the target ends at whitespace or ")".
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"`[^`\n]*`")


def links(text: str) -> list[str]:
    prose = CODE_SPAN.sub("", FENCE.sub("", text))
    return LINK.findall(prose)


def is_relative(target: str) -> bool:
    return not re.match(r"[a-z][a-z0-9+.-]*:", target, re.IGNORECASE) and not target.startswith("#")


def test_the_readme_is_short():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move detail into docs/"


def test_the_topic_documents_exist():
    names = {path.name for path in DOCUMENTS}
    assert {
        "api.md",
        "clients.md",
        "streams.md",
        "configuration.md",
        "operations.md",
        "scaling.md",
        "reliability.md",
        "security.md",
        "architecture.md",
        "benchmarks.md",
    } <= names


def test_every_relative_link_resolves_inside_the_repository():
    broken = []
    for document in DOCUMENTS:
        for target in links(document.read_text()):
            if not is_relative(target):
                continue
            path = unquote(target.split("#", 1)[0])
            resolved = (document.parent / path).resolve()
            if not resolved.is_relative_to(REPO) or not resolved.exists():
                broken.append(f"{document.relative_to(REPO)}: {target}")
    assert broken == []


def test_the_link_pattern_finds_links():
    assert links("see [a](docs/a.md#x) and ![b](b.png) but not `[c](c.md)`") == [
        "docs/a.md#x",
        "b.png",
    ]


def test_no_tracked_file_points_outside_the_repository():
    tracked = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True
    ).stdout.split(b"\0")
    outside = b"../" + b"shared"  # spelled in two parts so this file does not match
    found = []
    for name in filter(None, tracked):
        path = REPO / name.decode()
        if not path.is_file():
            continue
        if outside in path.read_bytes():
            found.append(name.decode())
    assert found == []
