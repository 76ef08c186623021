"""Helpers shared by the tests: request builders, status-detail parsing,
and polling for states that have no event to await."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import asyncpg
import grpc
from google.rpc import error_details_pb2, status_pb2

from devcluster.cluster import Cluster
from orderstream.orders.v1 import order_pb2, order_service_pb2
from service.app import App
from service.settings import Settings


def admin_ssl_context(cluster: Cluster) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(cluster.certificates.ca_cert))


def through_proxy(cluster: Cluster, port: int) -> Cluster:
    """`cluster` as reached through a proxy on 127.0.0.1:`port` (the server
    certificate names 127.0.0.1, so verify-full still holds)."""
    return dataclasses.replace(cluster, host="127.0.0.1", port=port)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def create_request(**overrides: object) -> order_service_pb2.CreateOrderRequest:
    fields: dict[str, object] = {
        "request_id": unique("req"),
        "customer_id": unique("cust"),
        "currency": "EUR",
        "items": [
            order_pb2.LineItem(sku="SKU-1", quantity=2, unit_price_cents=1250),
            order_pb2.LineItem(sku="SKU-2", quantity=1, unit_price_cents=99),
        ],
    }
    fields.update(overrides)
    return order_service_pb2.CreateOrderRequest(**fields)  # type: ignore[arg-type]


@dataclass
class StatusDetails:
    code: grpc.StatusCode
    message: str
    error_info: error_details_pb2.ErrorInfo | None = None
    violations: dict[str, str] = field(default_factory=dict)
    retry_info: error_details_pb2.RetryInfo | None = None
    error_info_count: int = 0


def details(error: grpc.aio.AioRpcError) -> StatusDetails:
    """Unpacks google.rpc.Status from the trailers, as a client library would."""
    found = StatusDetails(error.code(), error.details() or "")
    raw = dict(error.trailing_metadata() or ()).get("grpc-status-details-bin")
    if raw is None:
        return found
    status = status_pb2.Status.FromString(raw)
    assert status.code == error.code().value[0]
    for any_detail in status.details:
        for kind in (
            error_details_pb2.ErrorInfo,
            error_details_pb2.BadRequest,
            error_details_pb2.RetryInfo,
        ):
            if any_detail.Is(kind.DESCRIPTOR):
                detail = kind()
                any_detail.Unpack(detail)
                if isinstance(detail, error_details_pb2.ErrorInfo):
                    found.error_info = detail
                    found.error_info_count += 1
                elif isinstance(detail, error_details_pb2.BadRequest):
                    found.violations = {v.field: v.description for v in detail.field_violations}
                else:
                    found.retry_info = detail
    return found


async def rpc_error(call: Awaitable[object]) -> StatusDetails:
    """Awaits a call that must fail; returns its status details."""
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return details(error)
    raise AssertionError("the call succeeded")


async def eventually(
    check: Callable[[], Awaitable[bool]], *, timeout: float = 10.0, what: str = "condition"
) -> None:
    """Polls `check` for states nothing announces (e.g. pg_stat_activity)."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def table_counts(db: asyncpg.Pool) -> dict[str, int]:
    """Row counts of every table the service writes (tests run one at a time)."""
    return {
        table: await db.fetchval(f"SELECT count(*) FROM {table}")
        for table in ("orders", "order_items", "events")
    }


@contextlib.asynccontextmanager
async def running_app(env: dict[str, str], **overrides: str) -> AsyncIterator[App]:
    """A second service instance with its own pool and settings."""
    app = await App.start(Settings.from_env({**env, **overrides}))
    try:
        yield app
    finally:
        await app.stop(grace=5)


@contextlib.asynccontextmanager
async def row_locked(db: asyncpg.Pool, order_id: int) -> AsyncIterator[None]:
    """Holds a row lock on an order, so service statements on it block."""
    async with db.acquire() as conn, conn.transaction():
        await conn.execute("SELECT 1 FROM orders WHERE id = $1 FOR UPDATE", order_id)
        yield


async def backends_running(db: asyncpg.Pool, fragment: str) -> int:
    """Service backends currently executing a statement containing `fragment`."""
    return await db.fetchval(
        """
        SELECT count(*) FROM pg_stat_activity
        WHERE application_name = 'orderstream' AND state = 'active'
          AND position($1 IN query) > 0
        """,
        fragment,
    )


async def pool_is_full(app: App) -> bool:
    """Every connection of the app's pool is back in it (idle)."""
    return app.pool.get_idle_size() == app.pool.get_size()
