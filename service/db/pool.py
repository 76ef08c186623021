"""The process's one asyncpg pool: TLS-verified, configured from Settings.

Timestamps travel as integers (service/db/codecs.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import asyncpg

from service.db.codecs import register_codecs
from service.db.hosts import connect_in_turn
from service.errors import StartupError
from service.settings import DatabaseTarget, Settings

log = logging.getLogger(__name__)

# What talking to PostgreSQL raises when the server or the network fails:
# errors it reports, lost or refused connections, timeouts, and asyncpg's
# InternalClientError, which follows a connection the server ended between
# two statements ("another operation is in progress", seen in the fault
# soak). Whoever must outlive a database failure catches these.
DATABASE_FAILURES = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)


_TLS_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}


def ssl_context_for(target: DatabaseTarget, *, allow_insecure: bool) -> ssl.SSLContext | bool:
    """Builds the TLS settings for `target`, refusing anything unverified unless allowed."""
    if target.unix_sockets:
        _check_unix_sockets(target, allow_insecure)
    if not target.verifies_server:
        if not allow_insecure:
            raise StartupError(
                f"refusing database connection with sslmode={target.ssl_mode}: the server's "
                "identity would not be verified; use sslmode=verify-full, or set "
                "ORDERSTREAM_ALLOW_INSECURE_DATABASE=1 for local development only"
            )
        log.warning(
            "INSECURE DATABASE CONNECTION: sslmode=%s does not verify the database server; "
            "never use this outside local development",
            target.ssl_mode,
        )
    if target.ssl_mode == "disable":
        return False
    for path in (target.ssl_root_cert, target.ssl_cert, target.ssl_key, target.ssl_crl):
        if path is not None and not path.is_file():
            raise StartupError(f"database TLS file {path} does not exist or is not a file")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = _TLS_VERSIONS[target.ssl_min_protocol_version]
    if target.ssl_max_protocol_version is not None:
        context.maximum_version = _TLS_VERSIONS[target.ssl_max_protocol_version]
    if target.ssl_mode == "require":
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        context.check_hostname = target.ssl_mode == "verify-full"
        if target.ssl_root_cert is not None:
            context.load_verify_locations(cafile=target.ssl_root_cert)
        else:
            # libpq would demand ~/.postgresql/root.crt; a service in a container
            # is better served by the system trust store (managed databases).
            context.load_default_certs()
    if target.ssl_crl is not None:
        _load_crl(context, target)
    if target.ssl_cert is not None:
        context.load_cert_chain(target.ssl_cert, target.ssl_key)
    return context


def _check_unix_sockets(target: DatabaseTarget, allow_insecure: bool) -> None:
    """Neither libpq nor asyncpg speaks TLS over a Unix socket, whatever the
    sslmode: a socket host is a connection without TLS."""
    where = ", ".join(target.unix_sockets) if target.unix_sockets != ("",) else None
    what = (
        f"the Unix socket {where}"
        if where
        else "no host, so the default Unix sockets would be tried first"
    )
    if not allow_insecure:
        raise StartupError(
            f"refusing a database URL with {what}: it connects without TLS "
            f"(sslmode={target.ssl_mode} would not apply); name the server's TCP host, "
            "or set ORDERSTREAM_ALLOW_INSECURE_DATABASE=1 for local development only"
        )
    log.warning(
        "INSECURE DATABASE CONNECTION: %s, without TLS; never use this outside local development",
        what,
    )


def _load_crl(context: ssl.SSLContext, target: DatabaseTarget) -> None:
    """The server's certificate is checked against the CRL (libpq's
    sslcrl); a CRL only means something when the certificate is verified."""
    if context.verify_mode != ssl.CERT_REQUIRED:
        raise StartupError(
            f"sslcrl needs sslmode=verify-full or verify-ca, not sslmode={target.ssl_mode}"
        )
    try:
        context.load_verify_locations(cafile=target.ssl_crl)
    except ssl.SSLError as exc:
        raise StartupError(
            f"cannot load the database CRL {target.ssl_crl}: {exc.reason or exc}"
        ) from None
    context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Replaces asyncpg's reset on release: a second round trip per call
    (advisory unlock, CLOSE ALL, UNLISTEN, RESET ALL), about 7% of a point
    read's CPU. Pooled connections never keep session state here (which also
    makes them safe behind a transaction-pooling PgBouncer): no session SET,
    cursors and temporary tables live in transactions, and LISTEN and the
    migrations' advisory lock use direct connections. asyncpg still rolls
    back a transaction left open before this runs."""


def _connect_options(
    settings: Settings, target: DatabaseTarget | None = None, *, direct: bool = False
) -> dict[str, Any]:
    """What every connection gets, pooled or `direct`, to the primary unless
    another `target` (the read replica) is given."""
    target = target or settings.database
    server_settings = {"application_name": "orderstream"}
    if direct or not settings.transaction_pooling:
        # Plan every execution of a prepared statement for its own values.
        # Under the default (auto), PostgreSQL switches a statement to its
        # generic plan after five executions, and for a selective filter
        # (StreamEvents by type or subject, ExportOrders by status) that
        # plan walks the primary key over the whole table: 32 ms instead of
        # 0.3 ms at 300k events, growing with the table. Planning each time
        # costs about 60 us on GetOrder and 125 us on ListOrders
        # (docs/scaling.md#query-plans). Behind PgBouncer this startup
        # parameter cannot be sent, and need not be: the statement cache is
        # off there, so every statement is parsed anew (unnamed) and
        # planned for its values all the same.
        server_settings["plan_cache_mode"] = "force_custom_plan"
        # The backstop behind the write-stall timeout: PostgreSQL ends a
        # session left idle in a transaction (a stream or load the service
        # failed to end), releasing its snapshot and locks. A startup
        # parameter: PgBouncer (1.18) refuses unknown ones, so behind it the
        # role carries it instead (docs/scaling.md#behind-pgbouncer), which
        # `open_pool` checks.
        server_settings["idle_in_transaction_session_timeout"] = _milliseconds(
            settings.idle_in_transaction_timeout
        )
    return {
        "dsn": target.dsn.reveal(),
        # Every host of a multi-host URL gets the same context: verify-full
        # checks each against its own name (asyncpg passes it per host).
        "ssl": ssl_context_for(target, allow_insecure=settings.allow_insecure_database),
        "target_session_attrs": target.target_session_attrs,
        "command_timeout": settings.command_timeout,
        "statement_cache_size": settings.statement_cache_size,
        "timeout": settings.pool_acquire_timeout,
        "server_settings": server_settings,
    }


def _connector(target: DatabaseTarget) -> Callable[..., Awaitable[asyncpg.Connection]]:
    """asyncpg.connect, or for several hosts one at a time, each within its
    share of the timeout (service/db/hosts.py)."""
    if len(target.addresses) > 1:
        return functools.partial(connect_in_turn, addresses=target.addresses)
    return asyncpg.connect


def _milliseconds(seconds: float) -> str:
    return str(max(1, round(seconds * 1000)))


async def connect_direct(settings: Settings) -> asyncpg.Connection:
    """A connection outside the pool, for session state such as LISTEN: to
    ORDERSTREAM_DIRECT_DATABASE_URL, past any transaction-pooling PgBouncer."""
    target = settings.direct_database
    conn = await _connector(target)(**_connect_options(settings, target, direct=True))
    await register_codecs(conn)
    return conn


@contextlib.asynccontextmanager
async def direct_session(settings: Settings) -> AsyncIterator[asyncpg.Connection]:
    """connect_direct for startup work (migrations), or StartupError."""
    with _startup_errors(settings.direct_database):
        conn = await connect_direct(settings)
    try:
        yield conn
    finally:
        await conn.close(timeout=settings.command_timeout)


@contextlib.contextmanager
def _startup_errors(target: DatabaseTarget) -> Iterator[None]:
    """Turns a failure to reach `target` into a StartupError that says why."""
    try:
        yield
    except ssl.SSLCertVerificationError as exc:
        raise StartupError(
            f"cannot verify the database server's certificate at {target.describe()}: "
            f"{exc.verify_message}"
        ) from None
    except DATABASE_FAILURES as exc:
        raise StartupError(
            f"cannot connect to the database at {target.describe()}: {type(exc).__name__}: {exc}"
        ) from None


async def open_pool(settings: Settings) -> asyncpg.Pool:
    """Opens the pool and proves one connection works, or raises StartupError."""
    with _startup_errors(settings.database):
        pool = await _create_pool(settings, settings.database, settings.pool_min_size)
        # min_size may be 0: make sure at least one connection can be made.
        backstop = await pool.fetchval(IDLE_IN_TRANSACTION_MS, timeout=settings.command_timeout)
    _check_backstop(settings, backstop)
    return pool


# What the pooled sessions really got: through PgBouncer, the role's setting.
IDLE_IN_TRANSACTION_MS = (
    "SELECT setting::bigint FROM pg_settings WHERE name = 'idle_in_transaction_session_timeout'"
)


def _check_backstop(settings: Settings, milliseconds: int) -> None:
    """Warns when pooled sessions have no idle-in-transaction backstop, or
    one that would cut a stream waiting on its reader before the write-stall
    timeout ends it: possible only behind PgBouncer, where the role (or the
    database) must carry the setting."""
    if milliseconds == 0 or milliseconds <= settings.write_stall_timeout * 1000:
        log.warning(
            "pooled sessions have idle_in_transaction_session_timeout=%dms; set it on the "
            "role above ORDERSTREAM_WRITE_STALL_TIMEOUT (ALTER ROLE ... SET "
            "idle_in_transaction_session_timeout = '%ds')",
            milliseconds,
            round(settings.idle_in_transaction_timeout),
        )


async def open_replica_pool(settings: Settings, target: DatabaseTarget) -> asyncpg.Pool:
    """The read replica's pool: TLS rules and sizes as the primary's, but it
    connects on demand (min_size 0), so a replica that is down at startup
    does not stop the service; service/db/replica.py finds out."""
    return await _create_pool(settings, target, 0)


async def _create_pool(settings: Settings, target: DatabaseTarget, min_size: int) -> asyncpg.Pool:
    return await asyncpg.create_pool(
        **_connect_options(settings, target),
        connect=_connector(target),
        min_size=min_size,
        max_size=settings.pool_max_size,
        max_inactive_connection_lifetime=settings.pool_max_idle,
        init=register_codecs,
        reset=_keep_session,
    )


async def left_the_primary(pool: asyncpg.Pool) -> None:
    """A connection of `pool` found its server read-only (a standby, or a
    primary since demoted or fenced): every connection made before is
    closed instead of being used again (the one in hand on its release),
    and new ones are made with target_session_attrs, which skips a server
    that cannot write."""
    log.warning("the database server is read-only: reconnecting the pool to a writable one")
    await pool.expire_connections()


def was_connecting(pool: asyncpg.Pool) -> bool:
    """Asked after an acquire timed out: a pool with room for another
    connection was waiting to open one, so the database (or the network to
    it) did not answer; a full pool was only busy."""
    return pool.get_size() < pool.get_max_size()


async def close_pool(pool: asyncpg.Pool, timeout: float) -> None:
    """Closes gracefully; connections still busy after `timeout` are cut."""
    try:
        await asyncio.wait_for(pool.close(), timeout)
    except TimeoutError:
        log.warning("pool did not close within %.1fs; terminating connections", timeout)
        pool.terminate()
