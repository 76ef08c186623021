"""`python -m service [serve|migrate]`: the process entry point."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Coroutine
from dataclasses import replace as dataclasses_replace
from typing import Any

from service.app import App
from service.db.migrate import migrate
from service.db.pool import direct_session
from service.errors import StartupError
from service.ops import garbage, logs, memory, workers
from service.ops.tracing import Tracing
from service.rpc.exposure import refuse_unauthenticated
from service.settings import Settings, SettingsError

log = logging.getLogger("service")

EXIT_CONFIG = 2


async def _serve(settings: Settings, reuse_port: bool = False) -> None:
    app = await App.start(settings, reuse_port=reuse_port, tracing=Tracing.from_env(os.environ))
    loop = asyncio.get_running_loop()
    # Rotated tokens or certificate: take them now, not at the next poll.
    # Every handler is in place before "serving" is logged, so a signal
    # sent after it always counts: a SIGTERM that came first would kill the
    # process outright (CI once saw an exit by SIGTERM just after "serving").
    loop.add_signal_handler(signal.SIGHUP, app.reload_now)
    stopping = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    log.info(
        "serving",
        extra={
            "port": app.port,
            "tls": settings.tls is not None,
            "mtls": settings.tls is not None and settings.tls.client_ca is not None,
            "health_port": app.health_port,
            "metrics_port": app.metrics_port,
        },
    )
    await stopping.wait()
    log.info("shutting down", extra={"grace_seconds": settings.shutdown_grace})
    await app.stop()
    log.info("stopped")


async def _migrate(settings: Settings) -> None:
    # A direct connection: the advisory lock is session state.
    async with direct_session(settings) as conn:
        applied = await migrate(conn)
    log.info("migrations done", extra={"applied": applied})


def _run(settings: Settings, main: Coroutine[Any, Any, None]) -> None:
    if settings.event_loop == "uvloop":
        import uvloop

        uvloop.run(main)
    else:
        asyncio.run(main)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__)
    parser.add_argument("command", nargs="?", default="serve", choices=("serve", "migrate"))
    # Settings come from the environment; --workers is the one exception,
    # mirroring ORDERSTREAM_WORKERS, because the process model is named so
    # in the deployment's runbook (`--workers N`).
    parser.add_argument(
        "--workers", type=int, help="overrides ORDERSTREAM_WORKERS: processes sharing the port"
    )
    args = parser.parse_args(argv)
    memory.keep_reads_off_mmap()  # before any thread starts or worker forks
    logs.configure("INFO")
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        log.error("invalid settings: %s", exc)
        return EXIT_CONFIG
    if args.workers is not None:
        if args.workers < 1:
            parser.error("--workers must be at least 1")
        settings = dataclasses_replace(settings, workers=args.workers)
    logs.configure(settings.log_level)
    if args.command == "migrate":
        return _run_checked(settings, _migrate(settings))
    # Until the server can act on it, a SIGHUP (a reload request) must not
    # end the process, as its default action would.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    garbage.settle()  # before the workers fork: they share the frozen pages
    if settings.workers > 1:
        try:
            # Once, before forking: one error rather than one per worker.
            refuse_unauthenticated(settings)
            return workers.run(
                settings, settings.workers, lambda own: _run_checked(own, _serve(own, True))
            )
        except StartupError as exc:
            log.error("cannot start: %s", exc)
            return EXIT_CONFIG
    return _run_checked(settings, _serve(settings))


def _run_checked(settings: Settings, command: Coroutine[Any, Any, None]) -> int:
    try:
        _run(settings, command)
    except StartupError as exc:
        log.error("cannot start: %s", exc)
        return EXIT_CONFIG
    return 0


if __name__ == "__main__":
    sys.exit(main())
