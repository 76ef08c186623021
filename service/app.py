"""Builds, starts and stops one orderstream server process.

`App.start` opens the pool (verifying the database's certificate), applies
migrations, binds the port (0 picks a free one, which tests rely on) and
starts serving; `App.stop` is the graceful shutdown SIGTERM triggers.

Besides the main listener (plain text or TLS/mTLS) it may serve health alone
on a plain-text port, for Kubernetes' gRPC probes, which cannot speak TLS,
and Prometheus metrics over HTTP on another.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass

import asyncpg
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from orderstream.events.v1 import event_service_pb2
from orderstream.orders.v1 import order_service_pb2
from service.db.expiry import forget_expired_forever
from service.db.migrate import migrate
from service.db.pool import (
    close_pool,
    connect_direct,
    direct_session,
    open_pool,
    open_replica_pool,
)
from service.db.replica import ReplicaMonitor
from service.db.routing import ReadRouter
from service.db.runner import Database
from service.errors import StartupError
from service.events.feed import EventFeed
from service.events.lag import ConsumerLag
from service.events.pacing import RoundPacer
from service.events.retention import Retention
from service.events.service import EventService
from service.events.tail import Tail
from service.ops.memory import trim_memory_forever
from service.ops.metrics import Metrics, MetricsEndpoint
from service.ops.ports import check_port_free
from service.ops.reloading import Reloader, WatchedFiles
from service.ops.tracing import Tracing
from service.orders.page_token import PageTokens
from service.orders.service import OrderService
from service.rpc import registry
from service.rpc.acceptors import Acceptors
from service.rpc.auth import SCOPES, TokenAuth, Tokens, read_tokens_file
from service.rpc.cert_identities import CertificateIdentities, read_identities_file
from service.rpc.exposure import check_exposure
from service.rpc.health import DatabaseHealth, HealthServicer
from service.rpc.listener import server_credentials, watched_certificate
from service.rpc.observing import Observer
from service.settings import Settings
from service.streams.limits import StreamSlots, StreamTimeouts

log = logging.getLogger(__name__)

# Calls beyond ORDERSTREAM_MAX_CONCURRENT_RPCS and the health watches that
# gRPC still admits: health Checks and reflection.
BACKSTOP_CALLS = 100

ORDER_SERVICE = order_service_pb2.DESCRIPTOR.services_by_name["OrderService"]
EVENT_SERVICE = event_service_pb2.DESCRIPTOR.services_by_name["EventService"]
SERVICE_NAMES = (ORDER_SERVICE.full_name, EVENT_SERVICE.full_name)
LIVENESS_SERVICE = "liveness"


def _page_tokens(settings: Settings) -> PageTokens:
    if settings.page_token_key is not None:
        return PageTokens(settings.page_token_key.reveal().encode())
    log.warning(
        "ORDERSTREAM_PAGE_TOKEN_KEY is not set: using a random key, so page tokens "
        "will not work across replicas or restarts"
    )
    return PageTokens(secrets.token_bytes(32))


@dataclass(kw_only=True)
class App:
    """A running server process: what `stop` must wind down, and the ports
    it bound (tests bind port 0 and read them here)."""

    settings: Settings
    pool: asyncpg.Pool
    servers: Acceptors
    port: int
    health: DatabaseHealth
    health_task: asyncio.Task[None]
    trim_task: asyncio.Task[None]
    expiry_task: asyncio.Task[None]
    lag_task: asyncio.Task[None]
    feed: EventFeed
    streams: StreamSlots
    followers: StreamSlots
    metrics: Metrics
    observer: Observer
    # Health alone on a plain-text port, for Kubernetes' probes.
    health_server: grpc.aio.Server | None = None
    health_port: int | None = None
    metrics_endpoint: MetricsEndpoint | None = None
    tracing: Tracing | None = None
    replica: ReplicaMonitor | None = None
    replica_task: asyncio.Task[None] | None = None
    # Re-reads the tokens file and the listener's certificate when they change.
    reloader: Reloader | None = None
    reload_task: asyncio.Task[None] | None = None
    # Deletes expired events, with ORDERSTREAM_EVENT_RETENTION.
    retention_task: asyncio.Task[None] | None = None

    @property
    def metrics_port(self) -> int | None:
        return self.metrics_endpoint.port if self.metrics_endpoint else None

    def reload_now(self) -> None:
        """Checks the tokens file and the listener's certificate for changes
        now, not at the next poll (SIGHUP)."""
        if self.reloader is not None:
            self.reloader.reload_now()

    @classmethod
    async def start(
        cls, settings: Settings, *, reuse_port: bool = False, tracing: Tracing | None = None
    ) -> App:
        """`reuse_port`: share the ports with sibling workers (--workers)."""
        check_exposure(settings)
        pool = await open_pool(settings)
        replica_pool = None
        try:
            if settings.migrate_on_start:
                # The advisory lock is session state: not on a pooled connection.
                async with direct_session(settings) as conn:
                    await migrate(conn)
            if settings.replica is not None:
                replica_pool = await open_replica_pool(settings, settings.replica)
            return await cls._serve(settings, pool, replica_pool, reuse_port, tracing)
        except BaseException:
            if replica_pool is not None:
                await close_pool(replica_pool, settings.shutdown_grace)
            await close_pool(pool, settings.shutdown_grace)
            raise

    @classmethod
    async def _serve(
        cls,
        settings: Settings,
        pool: asyncpg.Pool,
        replica_pool: asyncpg.Pool | None,
        reuse_port: bool,
        tracing: Tracing | None,
    ) -> App:
        metrics = Metrics()
        metrics.watch_pool(pool)
        lag = ConsumerLag()
        metrics.registry.register(lag)
        tokens = _watched_tokens(settings)
        identities = _watched_identities(settings)
        certificate, credentials = _listener_credentials(settings)
        sharing = reuse_port or settings.acceptors > 1
        if sharing and not reuse_port:
            check_port_free(settings.host, settings.port)
        options = _server_options(settings, sharing)
        interceptors = _interceptors(tokens, metrics, identities)
        servers = Acceptors(
            settings.acceptors,
            lambda: grpc.aio.server(
                options=options,
                interceptors=interceptors,
                # The service's own calls are bounded, with details and
                # counted, by the Observer, across acceptors; gRPC's own
                # bound (no details, no hook to count it, per acceptor) is a
                # backstop for health and reflection calls on top.
                maximum_concurrent_rpcs=settings.max_concurrent_rpcs
                + settings.max_health_watches
                + BACKSTOP_CALLS,
            ),
        )
        db = Database(
            pool,
            acquire_timeout=settings.pool_acquire_timeout,
            command_timeout=settings.command_timeout,
        )
        reads, monitor = await _read_router(settings, db, pool, replica_pool, metrics)
        feed = EventFeed(
            lambda: connect_direct(settings),
            Tail(settings.feed_buffer_bytes),
            pacer=RoundPacer(settings.feed_busy_interval),
            poll_interval=settings.follow_poll_interval,
        )
        streams = StreamSlots(settings.max_streams, "stream")
        followers = StreamSlots(settings.max_followers, "follower")
        timeouts = StreamTimeouts(
            first_message=settings.first_message_timeout,
            client_idle=settings.client_idle_timeout,
            write_stall=settings.write_stall_timeout,
        )
        orders = OrderService(
            db,
            reads=reads,
            page_tokens=_page_tokens(settings),
            streams=streams,
            timeouts=timeouts,
            batch_bytes=settings.stream_batch_bytes,
            announce=feed.announce,
        )
        events = EventService(
            db,
            streams=streams,
            followers=followers,
            timeouts=timeouts,
            feed=feed,
            batch_bytes=settings.stream_batch_bytes,
            max_upload_events=settings.max_upload_events,
            heartbeat_interval=settings.heartbeat_interval,
            member_timeout=settings.group_member_timeout,
        )
        observer = Observer(
            metrics,
            tracing,
            max_calls=settings.max_concurrent_rpcs,
            client_certificates=settings.tls is not None and settings.tls.client_ca is not None,
        )
        health_servicer = HealthServicer(settings.max_health_watches, metrics.count_refusal)
        # For liveness probes: SERVING while the process answers at all, so
        # a database outage makes pods unready instead of restarting them.
        await health_servicer.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        # Not the generated add_*Servicer_to_server: a request that does not
        # parse must be INVALID_ARGUMENT, not UNKNOWN (service/rpc/registry.py).
        handlers = tuple(
            registry.generic_handler(
                observer.servicer(servicer, descriptor),
                descriptor,
                max_message_bytes=settings.max_message_bytes,
            )
            for servicer, descriptor in ((orders, ORDER_SERVICE), (events, EVENT_SERVICE))
        )
        # What reflection.enable_server_reflection registers for a grpc.aio
        # server, which it recognises by type (GenericOnly is not one).
        reflection_servicer = (
            reflection.aio.ReflectionServicer(
                (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME)
            )
            if settings.reflection
            else None
        )
        for server in servers:
            server.add_generic_rpc_handlers(handlers)
            generic = registry.GenericOnly(server)
            health_pb2_grpc.add_HealthServicer_to_server(health_servicer, generic)
            if reflection_servicer is not None:
                reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
                    reflection_servicer, generic
                )
        port = servers.listen(
            lambda server, port: _listen(
                server, settings.host, port, credentials() if credentials else None
            ),
            settings.port,
        )
        health_server = health_port = None
        if settings.health_port is not None:
            # One server: health checks are few; shared only by workers.
            health_server = grpc.aio.server(options=_server_options(settings, reuse_port))
            health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_server)
            health_port = _listen(health_server, settings.host, settings.health_port, None)
        watched = [files for files in (tokens, identities, certificate) if files is not None]
        reloader = Reloader(watched, settings.reload_interval) if watched else None
        database_health = DatabaseHealth(
            health_servicer,
            pool,
            SERVICE_NAMES,
            interval=settings.health_check_interval,
            timeout=min(settings.pool_acquire_timeout, settings.health_check_interval),
        )
        endpoint = _metrics_endpoint(settings, metrics)
        if tracing is not None:
            tracing.start()
        await servers.start()
        if health_server is not None:
            await health_server.start()
        await feed.start()
        return cls(
            settings=settings,
            pool=pool,
            servers=servers,
            port=port,
            health=database_health,
            health_task=asyncio.create_task(database_health.run(), name="database-health"),
            trim_task=asyncio.create_task(trim_memory_forever(), name="memory-trim"),
            expiry_task=asyncio.create_task(
                forget_expired_forever(
                    pool,
                    window=settings.idempotency_window,
                    interval=settings.idempotency_cleanup_interval,
                ),
                name="idempotency-expiry",
            ),
            lag_task=asyncio.create_task(
                lag.refresh_forever(pool, interval=settings.consumer_lag_interval),
                name="consumer-lag",
            ),
            feed=feed,
            streams=streams,
            followers=followers,
            metrics=metrics,
            observer=observer,
            health_server=health_server,
            health_port=health_port,
            metrics_endpoint=endpoint,
            tracing=tracing,
            replica=monitor,
            replica_task=(
                None
                if monitor is None
                else asyncio.create_task(monitor.run(), name="replica-monitor")
            ),
            reloader=reloader,
            reload_task=(
                None
                if reloader is None
                else asyncio.create_task(reloader.run(), name="reload-on-change")
            ),
            retention_task=(
                None
                if settings.event_retention is None
                else asyncio.create_task(
                    Retention(
                        pool,
                        keep=settings.event_retention,
                        hold_for_consumers=settings.retention_hold_for_consumers,
                    ).run_forever(settings.retention_interval),
                    name="event-retention",
                )
            ),
        )

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING at once, refuse new calls, let in-flight calls finish
        within the grace, then close the pool."""
        grace = self.settings.shutdown_grace if grace is None else grace
        loop = asyncio.get_running_loop()
        ends = loop.time() + grace
        # Queued before health.stop() wakes the Watch streams, so every
        # acceptor refuses new calls before any client can see NOT_SERVING.
        stopping = self.servers.stop(grace)
        await self.health.stop()
        # Follow streams never finish by themselves: end them while it drains.
        await self.feed.close()
        await stopping
        self.observer.flush()  # the access lines of the calls that just ended
        await self.health_task
        tasks = [self.trim_task, self.expiry_task, self.lag_task]
        for optional in (self.reload_task, self.retention_task):
            if optional is not None:
                tasks.append(optional)
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # Probes keep seeing NOT_SERVING until the main listener is gone.
        if self.health_server is not None:
            await self.health_server.stop(None)
        # The calls are over, so their connections are back or being cut:
        # what is left of the grace, and at least a second, bounds the close.
        if self.replica is not None and self.replica_task is not None:
            self.replica.stop()
            await self.replica_task
            await close_pool(self.replica.pool, timeout=max(ends - loop.time(), 1.0))
        await close_pool(self.pool, timeout=max(ends - loop.time(), 1.0))
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.stop()
        if self.tracing is not None:
            self.tracing.shutdown()


def _server_options(settings: Settings, reuse_port: bool) -> list[tuple[str, int]]:
    return [
        # A second server on a taken port must fail, not silently share it:
        # only the process's own acceptors and sibling workers share on
        # purpose, after making sure no other process holds the port
        # (service/ops/ports.py).
        ("grpc.so_reuseport", int(reuse_port)),
        # Twice the limit: service/rpc/registry.py refuses what lies between
        # with details; gRPC refuses the rest without reading it.
        ("grpc.max_receive_message_length", 2 * settings.max_message_bytes),
        # After this age a connection gets GOAWAY: its calls run on (the
        # grace is unlimited, so follow streams are not cut), new calls
        # open a new connection (see ORDERSTREAM_MAX_CONNECTION_AGE).
        ("grpc.max_connection_age_ms", round(settings.max_connection_age * 1000)),
        # Streams one connection may hold (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS):
        # gRPC's default is unlimited, so a single connection could open any
        # number of open-ended calls.
        ("grpc.max_concurrent_streams", settings.max_concurrent_streams),
        *_keepalive_options(settings),
    ]


# The least interval between a client's pings that the server tolerates (a
# ping sooner is a strike; two strikes close the connection with
# "too_many_pings"). The Python client pings every 5 minutes while calls are
# open (clients/python's keepalive_options, docs/clients.md); gRPC servers'
# default minimum is those same 5 minutes, so timer jitter alone could make
# a strike. 30 s leaves that default far inside, and lets clients that must
# notice a dead server sooner ping as often as clients.md's example does.
MIN_CLIENT_PING_INTERVAL_MS = 30_000


def _keepalive_options(settings: Settings) -> list[tuple[str, int]]:
    """HTTP/2 pings, so a peer gone without a FIN (a node or a conntrack
    entry lost) is noticed: the server pings every ORDERSTREAM_KEEPALIVE_TIME
    and closes the connection, cancelling its calls and releasing their
    slots and connections, when no answer comes within
    ORDERSTREAM_KEEPALIVE_TIMEOUT. A peer that is alive but stopped reading
    answers pings; the write-stall timeout covers it (service/streams/writes.py)."""
    return [
        ("grpc.keepalive_time_ms", round(settings.keepalive_time * 1000)),
        ("grpc.keepalive_timeout_ms", round(settings.keepalive_timeout * 1000)),
        # Only connections with calls open are worth pinging: an idle one
        # holds nothing of ours, and max_connection_age retires it. Like the
        # client, which pings only while calls are open.
        ("grpc.keepalive_permit_without_calls", 0),
        # A follow stream may send nothing for hours; without this gRPC
        # stops pinging after two pings without data (its default), and the
        # client sets the same (max_pings_without_data 0).
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.min_ping_interval_without_data_ms", MIN_CLIENT_PING_INTERVAL_MS),
    ]


def _metrics_endpoint(settings: Settings, metrics: Metrics) -> MetricsEndpoint | None:
    if settings.metrics_port is None:
        return None
    try:
        return MetricsEndpoint.start(metrics.registry, settings.host, settings.metrics_port)
    except OSError as exc:
        raise StartupError(
            f"cannot serve metrics on port {settings.metrics_port}: {exc.strerror}"
        ) from None


async def _read_router(
    settings: Settings,
    db: Database,
    pool: asyncpg.Pool,
    replica_pool: asyncpg.Pool | None,
    metrics: Metrics,
) -> tuple[ReadRouter, ReplicaMonitor | None]:
    """Routes reads to the replica when there is one; its first check runs
    before serving, so routing is decided from the first call."""
    if replica_pool is None:
        return ReadRouter(db), None
    monitor = ReplicaMonitor(
        pool,
        replica_pool,
        max_lag=settings.replica_max_lag,
        interval=settings.replica_check_interval,
        timeout=settings.pool_acquire_timeout,
    )
    await monitor.check()
    metrics.watch_replica(monitor)
    replica_db = Database(
        replica_pool,
        acquire_timeout=settings.pool_acquire_timeout,
        command_timeout=settings.command_timeout,
    )
    return ReadRouter(db, replica_db, monitor, on_served=metrics.count_read), monitor


def _watched_tokens(settings: Settings) -> WatchedFiles[Tokens] | None:
    """The tokens file, read now (a bad one stops startup) and again when it changes."""
    path = settings.auth_tokens_file
    if path is None:
        return None
    return WatchedFiles(
        "tokens file",
        lambda: [read_tokens_file(path)],
        lambda contents: Tokens.parse(contents[0], path),
    )


def _watched_identities(settings: Settings) -> WatchedFiles[CertificateIdentities] | None:
    """The certificate identities file, read now and again when it changes."""
    path = settings.auth_cert_identities_file
    if path is None:
        return None
    return WatchedFiles(
        "certificate identities file",
        lambda: [read_identities_file(path)],
        lambda contents: CertificateIdentities.parse(contents[0], path, SCOPES),
    )


def _listener_credentials(
    settings: Settings,
) -> tuple[
    WatchedFiles[grpc.ServerCertificateConfiguration] | None,
    Callable[[], grpc.ServerCredentials] | None,
]:
    """The listener's certificate, read now and again when it changes, and
    what makes the credentials that serve it; neither in plain text.

    Credentials for each acceptor: each keeps the certificate configuration
    its fetcher last handed out, so credentials shared by several servers
    would hand a new certificate to only one of them."""
    tls = settings.tls
    if tls is None:
        return None, None
    certificate = watched_certificate(tls)
    return certificate, lambda: server_credentials(tls, certificate)


# Callers by certificate only: a token is never valid.
NO_TOKENS = Tokens(())


def _interceptors(
    tokens: WatchedFiles[Tokens] | None,
    metrics: Metrics,
    identities: WatchedFiles[CertificateIdentities] | None = None,
) -> list[grpc.aio.ServerInterceptor] | None:
    """None unless caller authentication is on (only with
    ORDERSTREAM_INSECURE_DEV may it be off): even a no-op interceptor costs
    every call about 26 µs (269 -> 295 µs of server CPU per call), so that
    path has none (the observing is done without one too)."""
    if tokens is None and identities is None:
        return None
    return [
        TokenAuth(
            (lambda: tokens.current) if tokens is not None else (lambda: NO_TOKENS),
            metrics.count_refusal,
            (lambda: identities.current) if identities is not None else None,
        )
    ]


def _listen(
    server: grpc.aio.Server, host: str, port: int, credentials: grpc.ServerCredentials | None
) -> int:
    """Binds `port` (0: any free one), with TLS when given `credentials`."""
    address = f"{host}:{port}"
    try:
        if credentials is None:
            bound = server.add_insecure_port(address)
        else:
            bound = server.add_secure_port(address, credentials)
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise StartupError(f"cannot listen on {address}: address in use or unavailable")
    return bound
