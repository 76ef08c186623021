"""Servers that the Go and Node client suites run against, besides the
plain-text session `app`: a closed service over mTLS that takes tokens too,
and a service process that comes back on the same port after the client
under test stops it with SIGTERM (a pod restarted behind its address)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from devcluster.cluster import make_certificates
from devcluster.process import ServiceProcess, process_env, service_process
from tests.support.apps import closed, running_app
from tests.support.client_identity import client_identity
from tests.support.tokens import write_tokens_file


@contextlib.asynccontextmanager
async def secured_service(
    service_env: dict[str, str], directory: Path
) -> AsyncIterator[dict[str, str]]:
    """Serves mTLS without the development switch: one client certificate
    named in the identities file (read and write), one from the same CA
    named nowhere (refused unless a token comes with it) and a token with
    both scopes. Yields them as the clients' ORDERSTREAM_* variables."""
    server = make_certificates(directory, hosts=("127.0.0.1",))
    known, stranger = client_identity("client-tests"), client_identity("client-stranger")
    files = {
        "client-ca.crt": known.ca_cert + stranger.ca_cert,
        "client.crt": known.cert,
        "client.key": known.key,
        "stranger.crt": stranger.cert,
        "stranger.key": stranger.key,
        "identities": b"client-tests read,write subject:CN=client-tests\n",
    }
    for name, content in files.items():
        (directory / name).write_bytes(content)
    tokens = write_tokens_file(directory)
    env = {
        **closed(service_env),
        "ORDERSTREAM_TLS_CERT": str(server.server_cert),
        "ORDERSTREAM_TLS_KEY": str(server.server_key),
        "ORDERSTREAM_TLS_CLIENT_CA": str(directory / "client-ca.crt"),
        "ORDERSTREAM_AUTH_CERT_IDENTITIES_FILE": str(directory / "identities"),
        "ORDERSTREAM_AUTH_TOKENS_FILE": str(tokens.file),
    }
    async with running_app(env) as app:
        yield {
            "ORDERSTREAM_TLS_TARGET": f"127.0.0.1:{app.port}",
            "ORDERSTREAM_CA_FILE": str(server.ca_cert),
            "ORDERSTREAM_CLIENT_CERT": str(directory / "client.crt"),
            "ORDERSTREAM_CLIENT_KEY": str(directory / "client.key"),
            "ORDERSTREAM_STRANGER_CERT": str(directory / "stranger.crt"),
            "ORDERSTREAM_STRANGER_KEY": str(directory / "stranger.key"),
            "ORDERSTREAM_TOKEN": tokens.both,
        }


@dataclass
class Restarting:
    """The first process (the client under test sends it SIGTERM) and the
    task that starts the second on its port once it has exited."""

    first: ServiceProcess
    second: asyncio.Task[ServiceProcess]

    def client_env(self) -> dict[str, str]:
        return {
            "ORDERSTREAM_RESTART_TARGET": f"127.0.0.1:{self.first.port}",
            "ORDERSTREAM_RESTART_PID": str(self.first.pid),
        }


def port_below_the_ephemeral_range() -> int:
    """A free port no outgoing connection can be given. A port the kernel
    picked (ORDERSTREAM_PORT=0) lies in the ephemeral range, and between
    the first process's exit and the second's start any connection the
    suite opens may take it as its own, so the second could not listen
    (a Go client test once waited out every reconnect)."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for candidate in random.sample(range(low // 2, low), 100):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", candidate))
            except OSError:
                continue
            return candidate
    raise RuntimeError(f"no free port between {low // 2} and {low}")


@contextlib.asynccontextmanager
async def restarted_after_sigterm(service_env: dict[str, str]) -> AsyncIterator[Restarting]:
    """`python -m service serve`, and a second one on the same port as soon
    as the first has exited; whichever still runs is ended on exit."""
    port = str(port_below_the_ephemeral_range())
    async with contextlib.AsyncExitStack() as processes:
        first = await processes.enter_async_context(
            service_process(process_env(service_env, ORDERSTREAM_PORT=port), "serve")
        )
        await first.wait_serving()

        async def restart() -> ServiceProcess:
            await first.process.wait()
            env = process_env(service_env, ORDERSTREAM_PORT=str(first.port))
            second = await processes.enter_async_context(service_process(env, "serve"))
            await second.wait_serving()
            return second

        restarting = Restarting(first, asyncio.create_task(restart()))
        try:
            yield restarting
        finally:
            restarting.second.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await restarting.second
