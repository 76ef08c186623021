"""Applies the ordered SQL files in migrations/ exactly once per database.

Many replicas may start at once: a session-level advisory lock serialises
them, and each file runs in its own transaction together with the row that
records it, so a crash mid-way leaves no half-applied migration. The lock
needs a direct (session) connection, not one through a transaction-pooling
PgBouncer.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from importlib import resources

import asyncpg

log = logging.getLogger(__name__)

# An arbitrary constant pair shared by every orderstream process. The
# two-integer key form keeps clear of the single-bigint keys that the event
# feed's writers announce themselves with (migrations/0002_streaming.sql).
_ADVISORY_LOCK_KEY = (0x6F72_6465, 0x7273)  # "orders"
_FILE_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def available_migrations() -> list[Migration]:
    folder = resources.files("service.db") / "migrations"
    found = []
    for entry in folder.iterdir():
        match = _FILE_NAME.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), entry.name, entry.read_text()))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"duplicate migration versions in {versions}")
    return found


async def migrate(conn: asyncpg.Connection) -> list[str]:
    """Applies pending migrations on `conn`; returns the names it applied."""
    applied_now = []
    await conn.execute("SELECT pg_advisory_lock($1, $2)", *_ADVISORY_LOCK_KEY)
    try:
        await conn.execute(
            """
            CREATE TABLE IF NOT EXISTS schema_migrations (
                version    integer PRIMARY KEY,
                name       text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now()
            )
            """
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for migration in available_migrations():
            if migration.version in done:
                continue
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                    migration.version,
                    migration.name,
                )
            log.info("applied migration", extra={"migration": migration.name})
            applied_now.append(migration.name)
    finally:
        # A broken connection has already dropped its session lock.
        if not conn.is_closed():
            await conn.execute("SELECT pg_advisory_unlock($1, $2)", *_ADVISORY_LOCK_KEY)
    return applied_now
