"""What the database layer raises for its own failures, for the rpc layer
(service/rpc/status_map.py) to report: this layer knows nothing of gRPC.

Not subclasses of OSError or TimeoutError on purpose: those mean a
connection or statement failed (service/db/pool.py's DATABASE_FAILURES,
service/db/routing.py's _REPLICA_LOST), while these say why no statement ran.
"""

from __future__ import annotations


class DatabaseFailure(Exception):
    """The database layer could not run a call's statements."""


class NoConnection(DatabaseFailure):
    """No connection within the acquire timeout (`timeout`, in seconds)."""

    def __init__(self, timeout: float) -> None:
        super().__init__(timeout)
        self.timeout = timeout


class PoolExhausted(NoConnection):
    """Every pooled connection stayed busy: the database is fine, this
    process has too much to do."""

    def __str__(self) -> str:
        return f"no database connection became free within {self.timeout:g}s"


class DatabaseNotAnswering(NoConnection):
    """The pool had room, but the new connection did not open: the database
    (or the network to it) does not answer."""

    def __str__(self) -> str:
        return f"the database did not accept a connection within {self.timeout:g}s"


class CallDeadlineReached(DatabaseFailure):
    """The call's deadline ran out before (or while waiting for) a connection
    or a statement."""
