"""Bearer tokens: a tokens file with a reader, a writer and a token with
both scopes, and the metadata that carries one."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TokenSet:
    """Tokens written to a tokens file, by the scopes they carry."""

    reader: str
    writer: str
    both: str
    file: Path

    def all(self) -> tuple[str, ...]:
        return (self.reader, self.writer, self.both)


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def write_tokens_file(directory: Path) -> TokenSet:
    reader, writer, both = (secrets.token_urlsafe(32) for _ in range(3))
    path = directory / "tokens"
    path.write_text(
        "# name  sha256  scopes\n"
        f"reporting {digest(reader)} read\n"
        f"ingest    {digest(writer)} write   # uploads only\n"
        "\n"
        f"billing   {digest(both)} read,write\n"
    )
    return TokenSet(reader, writer, both, path)


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)
