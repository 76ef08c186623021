"""A multi-host URL's hosts tried one at a time, each within its own share
of the connect timeout.

asyncpg tries a URL's hosts in order, as libpq does, but within one
timeout for all of them: a host that takes the connection and never
answers (a machine gone without a trace, the usual way a primary is lost)
spends the whole timeout, and the next host, the new primary, is never
tried. libpq bounds each host by connect_timeout instead; so does this:
every attempt gets an equal share of the timeout. target_session_attrs is
checked per host, as asyncpg checks it (prefer-standby: a standby if one
answers, else any host).

A host that could not be reached is tried after the others until it is
reached again (pgjdbc keeps the same kind of record). Without that, every
connection the pool opens after its primary went silent (to grow, or to
replace one it dropped) would first spend the silent host's share of the
timeout before reaching the new primary. The record is the process's:
every pool and direct connection to the same hosts learns from the
others.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg

Address = tuple[str, int]

# Addresses whose last connection attempt failed before a session began.
_unreachable: set[Address] = set()


def in_turn(addresses: Sequence[Address]) -> list[Address]:
    """`addresses` in URL order, those last found unreachable after the rest."""
    return sorted(addresses, key=lambda address: address in _unreachable)


async def connect_in_turn(
    dsn: str,
    *,
    addresses: Sequence[Address],
    timeout: float,
    target_session_attrs: str,
    **options: Any,
) -> asyncpg.Connection:
    """asyncpg.connect to the first of `addresses` whose session matches;
    as asyncpg does, a host that could not be reached (refused, timed out,
    failed TLS verification) is named in the error over one that did not
    match."""
    rounds = (
        ["standby", "any"] if target_session_attrs == "prefer-standby" else [target_session_attrs]
    )
    share = timeout / (len(addresses) * len(rounds))
    unreachable: OSError | None = None
    mismatched: asyncpg.TargetServerAttributeNotMatched | None = None
    for attrs in rounds:
        for host, port in in_turn(addresses):
            try:
                conn = await asyncpg.connect(
                    dsn,
                    host=host,
                    port=port,
                    timeout=share,
                    target_session_attrs=attrs,
                    **options,
                )
            except OSError as exc:  # TimeoutError and ssl.SSLError among them
                unreachable = exc
                _unreachable.add((host, port))
            except asyncpg.TargetServerAttributeNotMatched as exc:
                mismatched = exc
                _unreachable.discard((host, port))
            else:
                _unreachable.discard((host, port))
                return conn
    error = unreachable or mismatched
    assert error is not None
    raise error
