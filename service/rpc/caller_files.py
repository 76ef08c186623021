"""What the tokens file (auth.py) and the certificate identities file
(cert_identities.py) share: each is a mounted Secret with one caller per
line, `#` comments, and a name for the logs first. Errors name the setting,
the file and the line, never the content."""

from __future__ import annotations

import re
from pathlib import Path

from service.errors import StartupError

# Names reach logs and error metadata.
NAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
NAME_RULE = "the name must be 1 to 64 of A-Z a-z 0-9 _ . @ -"


def read(setting: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise StartupError(f"cannot read {setting} {path}: {exc.strerror}") from None


def lines(data: bytes, setting: str, path: Path, *, listing: str) -> list[tuple[str, str]]:
    """(where, content) of every line with content, comments cut; `where`
    names it in errors. A file with none lists no `listing`."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise StartupError(f"cannot read {setting} {path}: not UTF-8") from None
    found = [
        (f"{setting} {path} line {number}", content)
        for number, line in enumerate(text.splitlines(), start=1)
        if (content := line.split("#", 1)[0].strip())
    ]
    if not found:
        raise StartupError(f"{setting} {path} lists no {listing}")
    return found
