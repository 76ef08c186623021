"""In-process service instances besides the session's `app` fixture."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import grpc

from service.app import App
from service.settings import Settings


@contextlib.asynccontextmanager
async def running_app(env: dict[str, str], **overrides: str) -> AsyncIterator[App]:
    """A second service instance with its own pool and settings."""
    app = await App.start(Settings.from_env({**env, **overrides}))
    try:
        yield app
    finally:
        await app.stop(grace=5)


@contextlib.asynccontextmanager
async def app_with_channel(
    env: dict[str, str], **overrides: str
) -> AsyncIterator[tuple[App, grpc.aio.Channel]]:
    """`running_app`, and a channel to it."""
    async with (
        running_app(env, **overrides) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel,
    ):
        yield app, channel


async def pool_is_full(app: App) -> bool:
    """Every connection of the app's pool is back in it (idle)."""
    return app.pool.get_idle_size() == app.pool.get_size()


def closed(env: dict[str, str]) -> dict[str, str]:
    """`env` without the development switch the test fixtures set: the
    service as deployed, which must authenticate its callers."""
    return {name: value for name, value in env.items() if name != "ORDERSTREAM_INSECURE_DEV"}
