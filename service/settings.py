"""Settings, read once from the environment into a typed, immutable object.

Database connection settings use libpq's names where libpq has one
(DATABASE_URL query parameters win over PGSSL* variables, as in libpq);
everything else is ORDERSTREAM_*. Secrets are wrapped so that neither `repr`
nor a log line can show them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import SplitResult, parse_qsl, unquote, urlencode, urlsplit, urlunsplit

T = TypeVar("T")

# The longest idempotency window, 90 days: records beyond that are a
# history, not a retry's key, and their tables would grow without need.
IDEMPOTENCY_WINDOW_LIMIT = 90 * 86_400.0

# The longest event retention, ten years; longer is keeping them for ever
# (the setting unset).
EVENT_RETENTION_LIMIT = 3650 * 86_400.0

SSL_MODES = ("disable", "require", "verify-ca", "verify-full")
# Modes that would fall back to plain text without telling anyone.
_SILENT_FALLBACK_MODES = ("allow", "prefer")
# URL parameter -> the libpq variable it wins over. Every other ssl*
# parameter or PGSSL* variable is refused rather than silently ignored.
_SSL_PARAMETERS = {
    "sslmode": "PGSSLMODE",
    "sslrootcert": "PGSSLROOTCERT",
    "sslcert": "PGSSLCERT",
    "sslkey": "PGSSLKEY",
    "sslcrl": "PGSSLCRL",
    "ssl_min_protocol_version": "PGSSLMINPROTOCOLVERSION",
    "ssl_max_protocol_version": "PGSSLMAXPROTOCOLVERSION",
}
_LIBPQ_TLS_VARIABLE = re.compile(r"PGSSL[A-Z]*|PGREQUIRESSL")
# libpq's target_session_attrs (PostgreSQL 14's set, which asyncpg has too):
# which of a multi-host URL's servers a connection may stay on.
SESSION_ATTRS = ("any", "read-write", "read-only", "primary", "standby", "prefer-standby")
# The pool that writes, and the feed's LISTEN, need the primary: neither a
# standby nor a server made read-only can do their work.
PRIMARY_SESSION_ATTRS = ("read-write", "primary")
# libpq also knows TLSv1 and TLSv1.1; neither is offered here.
TLS_VERSIONS = ("TLSv1.2", "TLSv1.3")


class SettingsError(ValueError):
    """A setting is missing or malformed; the message names the variable."""


class Secret:
    """A string that does not show itself in `repr`, `str` or f-strings."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class DatabaseTarget:
    """Where the database is and how the connection is secured."""

    dsn: Secret  # the URL without ssl* and target_session_attrs; holds the password
    host: str  # the first of `addresses`
    port: int
    ssl_mode: str
    ssl_root_cert: Path | None
    ssl_cert: Path | None
    ssl_key: Path | None
    ssl_crl: Path | None = None
    ssl_min_protocol_version: str = "TLSv1.2"
    ssl_max_protocol_version: str | None = None
    # Unix-socket directories among the hosts (or the default sockets, when
    # the URL names no host): libpq and asyncpg use no TLS over them.
    unix_sockets: tuple[str, ...] = ()
    # Every host:port of a multi-host URL, tried in order (libpq's rule),
    # each verified against its own name; the connection stays on the
    # first whose session matches `target_session_attrs`.
    addresses: tuple[tuple[str, int], ...] = ()
    target_session_attrs: str = "read-write"

    @property
    def verifies_server(self) -> bool:
        return self.ssl_mode == "verify-full"

    def describe(self) -> str:
        """Names the server for messages; never includes credentials."""
        where = ", ".join(_address(*a) for a in self.addresses) or f"{self.host}:{self.port}"
        return (
            f"{where} (sslmode={self.ssl_mode}, target_session_attrs={self.target_session_attrs})"
        )


@dataclass(frozen=True)
class ListenerTls:
    """The gRPC listener's certificate, and the CA its callers' must chain to."""

    cert: Path
    key: Path
    client_ca: Path | None  # set: every caller must present a certificate (mTLS)


@dataclass(frozen=True)
class Settings:
    database: DatabaseTarget
    # Session state (LISTEN, the migrations' advisory lock) needs a server
    # connection of its own: past a transaction-pooling PgBouncer, not through it.
    direct_database: DatabaseTarget
    transaction_pooling: bool
    allow_insecure_database: bool
    host: str
    port: int
    pool_min_size: int
    pool_max_size: int
    pool_acquire_timeout: float
    pool_max_idle: float
    command_timeout: float
    statement_cache_size: int
    shutdown_grace: float
    health_check_interval: float
    page_token_key: Secret | None
    max_streams: int
    max_followers: int
    feed_buffer_bytes: int
    feed_busy_interval: float
    stream_batch_bytes: int
    max_upload_events: int
    follow_poll_interval: float
    heartbeat_interval: float
    group_member_timeout: float
    consumer_lag_interval: float
    event_retention: float | None  # seconds; None keeps events for ever
    retention_hold_for_consumers: bool
    retention_interval: float
    migrate_on_start: bool
    event_loop: str
    log_level: str
    workers: int
    # grpc.aio servers per process sharing its port (service/rpc/acceptors.py).
    acceptors: int
    metrics_port: int | None
    health_port: int | None
    tls: ListenerTls | None
    auth_tokens_file: Path | None  # set: every call needs a token (service/rpc/auth.py)
    # Set: a call without a token is served by its client certificate's
    # identity and scopes (service/rpc/cert_identities.py); needs mTLS.
    auth_cert_identities_file: Path | None
    # The development switch: without it the service refuses to serve
    # callers it cannot authenticate (service/rpc/exposure.py).
    insecure_dev: bool
    # How often the tokens file and the listener's certificate are checked
    # for changes (service/ops/reloading.py); SIGHUP checks at once.
    reload_interval: float
    reflection: bool
    max_message_bytes: int
    max_concurrent_rpcs: int
    # HTTP/2 streams one client connection may hold open at once.
    max_concurrent_streams: int
    max_health_watches: int
    max_connection_age: float
    # A streaming standby for reads that tolerate lag (service/db/routing.py).
    replica: DatabaseTarget | None
    replica_max_lag: float
    replica_check_interval: float
    # Quiet callers (docs/streams.md#quiet-callers): how long a client stream
    # may wait for its first message and between messages, how long a
    # server stream's write may wait for the reader to take it.
    first_message_timeout: float
    client_idle_timeout: float
    write_stall_timeout: float
    # HTTP/2 pings that notice a peer gone without a FIN.
    keepalive_time: float
    keepalive_timeout: float
    # PostgreSQL's idle_in_transaction_session_timeout: the backstop that
    # ends a transaction the service itself failed to end.
    idle_in_transaction_timeout: float
    # How long request ids, upload ids and import ids are remembered, and how
    # often the records past that are forgotten (service/db/expiry.py).
    idempotency_window: float
    idempotency_cleanup_interval: float

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = _Reader(os.environ if environ is None else environ)
        pool_max_size = env.integer("ORDERSTREAM_POOL_MAX_SIZE", 10, low=1, high=1000)
        database = _database_target(env, "DATABASE_URL")
        transaction_pooling = env.boolean("ORDERSTREAM_TRANSACTION_POOLING", False)
        max_followers = env.integer("ORDERSTREAM_MAX_FOLLOWERS", 2000, low=0, high=100_000)
        # gRPC client-side health checking keeps one Watch per channel; each
        # costs memory for as long as it is open (about 27 KiB measured).
        max_health_watches = env.integer(
            "ORDERSTREAM_MAX_HEALTH_WATCHES", 1000, low=0, high=100_000
        )
        tls = _listener_tls(env)
        settings = cls(
            database=database,
            direct_database=_direct_database_target(env, database, transaction_pooling),
            transaction_pooling=transaction_pooling,
            allow_insecure_database=env.boolean("ORDERSTREAM_ALLOW_INSECURE_DATABASE", False),
            host=env.text("ORDERSTREAM_HOST", "[::]"),
            port=env.integer("ORDERSTREAM_PORT", 50051, low=0, high=65535),
            pool_min_size=env.integer("ORDERSTREAM_POOL_MIN_SIZE", 2, low=0, high=1000),
            pool_max_size=pool_max_size,
            pool_acquire_timeout=env.seconds("ORDERSTREAM_POOL_ACQUIRE_TIMEOUT", 5.0),
            pool_max_idle=env.seconds("ORDERSTREAM_POOL_MAX_IDLE", 300.0),
            command_timeout=env.seconds("ORDERSTREAM_COMMAND_TIMEOUT", 30.0),
            statement_cache_size=_statement_cache_size(env, transaction_pooling),
            shutdown_grace=env.seconds("ORDERSTREAM_SHUTDOWN_GRACE", 20.0),
            health_check_interval=env.seconds("ORDERSTREAM_HEALTH_CHECK_INTERVAL", 2.0),
            page_token_key=env.secret("ORDERSTREAM_PAGE_TOKEN_KEY"),
            # Streams reading the table at once (history, exports, loads, and
            # followers catching up): by default half the pool, so unary
            # calls always find a connection.
            max_streams=env.integer(
                "ORDERSTREAM_MAX_STREAMS", max(1, pool_max_size // 2), low=1, high=1000
            ),
            # Followers near the live end read only the shared tail, so they
            # cost memory (bounded per follower by the stream batch) and no
            # connection.
            max_followers=max_followers,
            feed_buffer_bytes=env.integer(
                "ORDERSTREAM_FEED_BUFFER_BYTES", 64 << 20, low=4 << 20, high=16 << 30
            ),
            feed_busy_interval=env.seconds(
                "ORDERSTREAM_FEED_BUSY_INTERVAL", 0.5, at_least=0.02, below=10.0
            ),
            stream_batch_bytes=env.integer(
                "ORDERSTREAM_STREAM_BATCH_BYTES", 1 << 20, low=1024, high=3 << 20
            ),
            follow_poll_interval=env.seconds("ORDERSTREAM_FOLLOW_POLL_INTERVAL", 1.0),
            heartbeat_interval=env.seconds("ORDERSTREAM_HEARTBEAT_INTERVAL", 5.0),
            group_member_timeout=env.seconds("ORDERSTREAM_GROUP_MEMBER_TIMEOUT", 10.0),
            consumer_lag_interval=env.seconds("ORDERSTREAM_CONSUMER_LAG_INTERVAL", 15.0),
            # An hour at least: a follower catching up after a restart must
            # not find its next events gone; ten years at most.
            event_retention=(
                env.seconds(
                    "ORDERSTREAM_EVENT_RETENTION",
                    0.0,
                    at_least=3_600.0,
                    below=EVENT_RETENTION_LIMIT,
                )
                if env.raw("ORDERSTREAM_EVENT_RETENTION") is not None
                else None
            ),
            retention_hold_for_consumers=env.boolean(
                "ORDERSTREAM_RETENTION_HOLD_FOR_CONSUMERS", False
            ),
            retention_interval=env.seconds("ORDERSTREAM_RETENTION_INTERVAL", 60.0),
            max_upload_events=env.integer(
                "ORDERSTREAM_MAX_UPLOAD_EVENTS", 10_000_000, low=1, high=1_000_000_000
            ),
            migrate_on_start=env.boolean("ORDERSTREAM_MIGRATE_ON_START", True),
            event_loop=env.choice("ORDERSTREAM_EVENT_LOOP", "uvloop", ("uvloop", "asyncio")),
            log_level=env.choice(
                "ORDERSTREAM_LOG_LEVEL", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR")
            ),
            workers=env.integer("ORDERSTREAM_WORKERS", 1, low=1, high=256),
            acceptors=env.integer("ORDERSTREAM_ACCEPTORS", 32, low=1, high=256),
            metrics_port=env.optional_integer("ORDERSTREAM_METRICS_PORT", low=0, high=65535),
            health_port=env.optional_integer("ORDERSTREAM_HEALTH_PORT", low=0, high=65535),
            tls=tls,
            auth_tokens_file=_optional_path(env, "ORDERSTREAM_AUTH_TOKENS_FILE"),
            auth_cert_identities_file=_cert_identities_file(env, tls),
            insecure_dev=env.boolean("ORDERSTREAM_INSECURE_DEV", False),
            reload_interval=env.seconds("ORDERSTREAM_RELOAD_INTERVAL", 5.0),
            reflection=env.boolean("ORDERSTREAM_REFLECTION", True),
            # gRPC's own default (4 MiB); uploads are packed in 1 MiB messages.
            max_message_bytes=env.integer(
                "ORDERSTREAM_MAX_MESSAGE_BYTES", 4 << 20, low=1024, high=256 << 20
            ),
            # Every follower is a call for its whole life: room for all of
            # them, and a thousand calls more. Health watches have their own
            # bound (service/app.py adds them to gRPC's backstop).
            max_concurrent_rpcs=env.integer(
                "ORDERSTREAM_MAX_CONCURRENT_RPCS",
                max_followers + 1000,
                low=1,
                high=1_000_000,
            ),
            # A client's channel carries all its calls on one connection,
            # follow streams included; a compliant client queues past this.
            max_concurrent_streams=env.integer(
                "ORDERSTREAM_MAX_CONCURRENT_STREAMS", 1000, low=1, high=100_000
            ),
            max_health_watches=max_health_watches,
            # kube-proxy balances connections, not calls: an aged-out client
            # connection reconnects and lands anywhere, new pods included.
            max_connection_age=env.seconds("ORDERSTREAM_MAX_CONNECTION_AGE", 300.0),
            replica=(
                _database_target(
                    env,
                    "ORDERSTREAM_REPLICA_DATABASE_URL",
                    session_attrs=SESSION_ATTRS,
                    default_session_attrs="prefer-standby",
                )
                if env.raw("ORDERSTREAM_REPLICA_DATABASE_URL") is not None
                else None
            ),
            replica_max_lag=env.seconds("ORDERSTREAM_REPLICA_MAX_LAG", 5.0),
            replica_check_interval=env.seconds("ORDERSTREAM_REPLICA_CHECK_INTERVAL", 1.0),
            first_message_timeout=env.seconds("ORDERSTREAM_FIRST_MESSAGE_TIMEOUT", 10.0),
            client_idle_timeout=env.seconds("ORDERSTREAM_CLIENT_IDLE_TIMEOUT", 30.0),
            write_stall_timeout=env.seconds("ORDERSTREAM_WRITE_STALL_TIMEOUT", 30.0),
            # gRPC's own floor for keepalive pings is 10 s; a timeout under a
            # second would count a busy peer as dead.
            keepalive_time=env.seconds("ORDERSTREAM_KEEPALIVE_TIME", 60.0, at_least=10.0),
            keepalive_timeout=env.seconds("ORDERSTREAM_KEEPALIVE_TIMEOUT", 20.0, at_least=1.0),
            # PostgreSQL counts it in milliseconds; under a second is no backstop.
            idle_in_transaction_timeout=env.seconds(
                "ORDERSTREAM_IDLE_IN_TRANSACTION_TIMEOUT", 60.0, at_least=1.0
            ),
            # A day covers a client's retries (seconds) and a batch job re-run
            # the next morning, the longest retry callers are told to expect;
            # an hour is the least, so a slow outage cannot outlast a key.
            idempotency_window=env.seconds(
                "ORDERSTREAM_IDEMPOTENCY_WINDOW",
                86_400.0,
                at_least=3_600.0,
                below=IDEMPOTENCY_WINDOW_LIMIT,
            ),
            idempotency_cleanup_interval=env.seconds(
                "ORDERSTREAM_IDEMPOTENCY_CLEANUP_INTERVAL", 60.0
            ),
        )
        if settings.pool_min_size > settings.pool_max_size:
            raise SettingsError(
                "ORDERSTREAM_POOL_MIN_SIZE must not exceed ORDERSTREAM_POOL_MAX_SIZE"
            )
        if settings.idle_in_transaction_timeout <= settings.write_stall_timeout:
            # A history stream or export waiting on its reader sits idle in
            # its transaction: the backstop must not fire before the stall
            # timeout ends the stream with its READER_STALLED status.
            raise SettingsError(
                "ORDERSTREAM_IDLE_IN_TRANSACTION_TIMEOUT "
                f"({settings.idle_in_transaction_timeout:g} s) must exceed "
                f"ORDERSTREAM_WRITE_STALL_TIMEOUT ({settings.write_stall_timeout:g} s): "
                "a stream waiting on a slow reader is idle in its transaction, and "
                "PostgreSQL would cut its connection before the stream could end cleanly"
            )
        return settings


class _Reader:
    """Typed access to environment variables; errors name the variable."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ

    def names(self) -> list[str]:
        """The variables that are set (not empty)."""
        return [name for name in self._environ if self.raw(name) is not None]

    def raw(self, name: str) -> str | None:
        value = self._environ.get(name)
        return value if value not in (None, "") else None

    def text(self, name: str, default: str) -> str:
        return self.raw(name) or default

    def secret(self, name: str) -> Secret | None:
        value = self.raw(name)
        return Secret(value) if value is not None else None

    def _parsed(self, name: str, default: T, parse: Callable[[str], T], expected: str) -> T:
        value = self.raw(name)
        if value is None:
            return default
        try:
            return parse(value)
        except ValueError:
            raise SettingsError(f"{name} must be {expected}, got {value!r}") from None

    def integer(self, name: str, default: int, *, low: int, high: int) -> int:
        expected = f"an integer from {low} to {high}"

        def parse(value: str) -> int:
            number = int(value)
            if not low <= number <= high:
                raise ValueError
            return number

        return self._parsed(name, default, parse, expected)

    def optional_integer(self, name: str, *, low: int, high: int) -> int | None:
        """Unset (or empty) means off."""
        if self.raw(name) is None:
            return None
        return self.integer(name, 0, low=low, high=high)

    def seconds(
        self,
        name: str,
        default: float,
        *,
        at_least: float | None = None,
        below: float = 86_400.0,
    ) -> float:
        """Above 0 (or `at_least` and more) and below a day (or `below`)."""

        def parse(value: str) -> float:
            number = float(value)
            if not 0 < number < below or (at_least is not None and number < at_least):
                raise ValueError
            return number

        low = "above 0" if at_least is None else f"from {at_least:g}"
        return self._parsed(name, default, parse, f"a number of seconds {low} and below {below:g}")

    def boolean(self, name: str, default: bool) -> bool:
        words = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}

        def parse(value: str) -> bool:
            if value.lower() not in words:
                raise ValueError
            return words[value.lower()]

        return self._parsed(name, default, parse, "one of: " + ", ".join(words))

    def choice(self, name: str, default: str, allowed: tuple[str, ...]) -> str:
        def parse(value: str) -> str:
            if value not in allowed:
                raise ValueError
            return value

        return self._parsed(name, default, parse, "one of: " + ", ".join(allowed))


def _optional_path(env: _Reader, name: str) -> Path | None:
    value = env.raw(name)
    return Path(value) if value is not None else None


def _listener_tls(env: _Reader) -> ListenerTls | None:
    cert, key = env.raw("ORDERSTREAM_TLS_CERT"), env.raw("ORDERSTREAM_TLS_KEY")
    client_ca = env.raw("ORDERSTREAM_TLS_CLIENT_CA")
    if cert is None and key is None:
        if client_ca is not None:
            raise SettingsError(
                "ORDERSTREAM_TLS_CLIENT_CA needs ORDERSTREAM_TLS_CERT and ORDERSTREAM_TLS_KEY"
            )
        return None
    if cert is None or key is None:
        raise SettingsError("ORDERSTREAM_TLS_CERT and ORDERSTREAM_TLS_KEY must be set together")
    return ListenerTls(Path(cert), Path(key), Path(client_ca) if client_ca else None)


def _cert_identities_file(env: _Reader, tls: ListenerTls | None) -> Path | None:
    path = _optional_path(env, "ORDERSTREAM_AUTH_CERT_IDENTITIES_FILE")
    if path is not None and (tls is None or tls.client_ca is None):
        raise SettingsError(
            "ORDERSTREAM_AUTH_CERT_IDENTITIES_FILE needs mTLS (ORDERSTREAM_TLS_CLIENT_CA): "
            "without it callers present no certificate"
        )
    return path


def _statement_cache_size(env: _Reader, transaction_pooling: bool) -> int:
    """asyncpg's cache keeps named prepared statements on the server
    connection, which a transaction-pooling PgBouncer hands to other clients."""
    size = env.integer(
        "ORDERSTREAM_STATEMENT_CACHE_SIZE", 0 if transaction_pooling else 100, low=0, high=100_000
    )
    if transaction_pooling and size != 0:
        raise SettingsError(
            "ORDERSTREAM_STATEMENT_CACHE_SIZE must be 0 (or unset) with "
            "ORDERSTREAM_TRANSACTION_POOLING=1: PgBouncer hands each transaction "
            "another server connection, where cached prepared statements do not exist"
        )
    return size


def _direct_database_target(
    env: _Reader, database: DatabaseTarget, transaction_pooling: bool
) -> DatabaseTarget:
    if env.raw("ORDERSTREAM_DIRECT_DATABASE_URL") is not None:
        return _database_target(env, "ORDERSTREAM_DIRECT_DATABASE_URL")
    if transaction_pooling:
        raise SettingsError(
            "ORDERSTREAM_TRANSACTION_POOLING=1 needs ORDERSTREAM_DIRECT_DATABASE_URL: "
            "LISTEN and the migrations' advisory lock need a session of their own, "
            "which a transaction-pooling PgBouncer does not keep"
        )
    return database


def _database_target(
    env: _Reader,
    name: str = "DATABASE_URL",
    *,
    session_attrs: tuple[str, ...] = PRIMARY_SESSION_ATTRS,
    default_session_attrs: str = "read-write",
) -> DatabaseTarget:
    """`name`'s URL; the PGSSL* variables and PGTARGETSESSIONATTRS apply to
    every database URL alike (the URL's parameters win, as in libpq), but
    each URL allows only the `session_attrs` its connections can use."""
    url = env.raw(name)
    if url is None:
        raise SettingsError(f"{name} is required (postgresql://user:password@host:port/db)")
    parts = urlsplit(url)
    if parts.scheme not in ("postgres", "postgresql"):
        raise SettingsError(f"{name} must start with postgresql://")
    query = parse_qsl(parts.query, keep_blank_values=True)
    _refuse_unsupported_ssl(env, name, [k for k, _ in query])
    from_url = {k: v for k, v in query if k in _SSL_PARAMETERS}
    remaining = [(k, v) for k, v in query if k not in (*_SSL_PARAMETERS, _SESSION_ATTRS)]
    attrs = _session_attrs(
        name,
        dict(query).get(_SESSION_ATTRS) or env.raw("PGTARGETSESSIONATTRS"),
        session_attrs,
        default_session_attrs,
    )

    def ssl_parameter(key: str) -> str | None:
        return from_url.get(key) or env.raw(_SSL_PARAMETERS[key])

    ssl_mode = ssl_parameter("sslmode") or "verify-full"
    if ssl_mode in _SILENT_FALLBACK_MODES:
        raise SettingsError(
            f"sslmode={ssl_mode} may fall back to plain text silently and is not supported; "
            "use verify-full (or, for local development only, disable/require with "
            "ORDERSTREAM_ALLOW_INSECURE_DATABASE=1)"
        )
    if ssl_mode not in SSL_MODES:
        raise SettingsError(f"sslmode must be one of: {', '.join(SSL_MODES)}, got {ssl_mode!r}")

    def path(key: str) -> Path | None:
        value = ssl_parameter(key)
        return Path(value) if value else None

    minimum = (
        _tls_version(ssl_parameter("ssl_min_protocol_version"), "ssl_min_protocol_version")
        or "TLSv1.2"
    )
    maximum = _tls_version(ssl_parameter("ssl_max_protocol_version"), "ssl_max_protocol_version")
    if maximum is not None and TLS_VERSIONS.index(maximum) < TLS_VERSIONS.index(minimum):
        raise SettingsError(
            f"{name}: ssl_max_protocol_version={maximum} is below "
            f"ssl_min_protocol_version={minimum}"
        )
    addresses = _addresses(name, parts, dict(query).get("host") or None, env.raw("PGHOST"))
    hosts = [host for host, _ in addresses]
    return DatabaseTarget(
        dsn=Secret(urlunsplit(parts._replace(query=urlencode(remaining)))),
        host=hosts[0] if hosts else "localhost",
        port=addresses[0][1] if addresses else _DEFAULT_PORT,
        ssl_mode=ssl_mode,
        ssl_root_cert=path("sslrootcert"),
        ssl_cert=path("sslcert"),
        ssl_key=path("sslkey"),
        ssl_crl=path("sslcrl"),
        ssl_min_protocol_version=minimum,
        ssl_max_protocol_version=maximum,
        unix_sockets=tuple(h for h in hosts if h.startswith(("/", "@"))) if hosts else ("",),
        addresses=tuple(addresses),
        target_session_attrs=attrs,
    )


_SESSION_ATTRS = "target_session_attrs"
_DEFAULT_PORT = 5432


def _session_attrs(name: str, value: str | None, allowed: tuple[str, ...], default: str) -> str:
    if value is None:
        return default
    if value not in allowed:
        raise SettingsError(
            f"{name}: target_session_attrs (or PGTARGETSESSIONATTRS) must be one of: "
            f"{', '.join(allowed)}, got {value!r}"
        )
    return value


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _refuse_unsupported_ssl(env: _Reader, name: str, url_keys: list[str]) -> None:
    """libpq's other TLS settings (sslpassword, sslcrldir, sslsni, ...) would
    be ignored by this service: refused, so nobody relies on one in vain."""
    unsupported = sorted(
        {k for k in url_keys if k.startswith("ssl") or k == "requiressl"} - set(_SSL_PARAMETERS)
    )
    if unsupported:
        raise SettingsError(
            f"{name} has TLS parameters this service does not support: "
            f"{', '.join(unsupported)} (supported: {', '.join(_SSL_PARAMETERS)})"
        )
    variables = sorted(
        {v for v in env.names() if _LIBPQ_TLS_VARIABLE.fullmatch(v)} - set(_SSL_PARAMETERS.values())
    )
    if variables:
        raise SettingsError(
            f"TLS variables this service does not support are set: {', '.join(variables)} "
            f"(supported: {', '.join(_SSL_PARAMETERS.values())})"
        )


def _tls_version(value: str | None, parameter: str) -> str | None:
    if value is None:
        return None
    if value not in TLS_VERSIONS:
        raise SettingsError(
            f"{parameter} (or {_SSL_PARAMETERS[parameter]}) must be one of: "
            f"{', '.join(TLS_VERSIONS)}, got {value!r}"
        )
    return value


def _addresses(
    name: str, parts: SplitResult, query_host: str | None, pg_host: str | None
) -> list[tuple[str, int]]:
    """The hosts asyncpg will try, in order, with their ports, as libpq
    reads them: the URL's `host` parameter, else its host part
    (`host1:port1,host2:port2`, percent-decoded, as a socket directory must
    be), else PGHOST. Empty: none named, and asyncpg tries the default Unix
    sockets first."""
    netloc_hosts = parts.netloc.rpartition("@")[2]
    spec = query_host or unquote(netloc_hosts) or pg_host or ""
    addresses = []
    for host in filter(None, spec.split(",")):
        port = ""
        if host.startswith("["):
            host, _, port = host[1:].partition("]")
            port = port.removeprefix(":")
        elif not host.startswith(("/", "@")):
            host, _, port = host.partition(":")
        addresses.append((host, _port(name, port)))
    return addresses


def _port(name: str, text: str) -> int:
    if not text:
        return _DEFAULT_PORT
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise SettingsError(f"{name} has an invalid port")
    return int(text)
