"""`python -m service serve --workers 2`: two real worker processes share one
port through SO_REUSEPORT, each with its own pool; SIGTERM to the parent
drains both, and the parent reaps them and exits 0."""

from __future__ import annotations

import asyncio
import signal
import socket

from devcluster.process import service_process
from tests.support.apps import running_app
from tests.support.connections import create_on_own_connection
from tests.support.polling import eventually
from tests.support.processes import backends_of, pool_closed, serve_env

CALLS = 24  # each on its own connection; the kernel hashes them over the workers


async def test_workers_share_the_port_and_drain_on_sigterm(service_env, login, admin):
    env = serve_env(service_env, login, grace=10, event_loop=None)
    env["ORDERSTREAM_HEALTH_PORT"] = "0"
    async with service_process(env, "serve", "--workers", "2") as child:
        started = await child.record("workers started")
        port, worker_pids = started["port"], set(started["workers"])
        assert port != 0 and len(worker_pids) == 2 and started["pid"] not in worker_pids

        def serving() -> list[dict]:
            return [entry for entry in child.records if entry.get("message") == "serving"]

        async def both_serving() -> bool:
            return len(serving()) == 2

        await eventually(both_serving, what="both workers to serve")
        assert {entry["pid"] for entry in serving()} == worker_pids
        assert {entry["port"] for entry in serving()} == {port}
        # The probe port is shared the same way.
        assert len({entry["health_port"] for entry in serving()}) == 1

        await asyncio.gather(*(create_on_own_connection(port) for _ in range(CALLS)))

        def rpc_lines() -> list[dict]:
            return [entry for entry in child.records if entry.get("message") == "rpc"]

        async def all_logged() -> bool:
            return len(rpc_lines()) == CALLS

        await eventually(all_logged, what="an access-log line per call")
        assert {entry["pid"] for entry in rpc_lines()} == worker_pids
        # Two pools (min size 2 each) and two feed connections: one process
        # would have three backends at most before any load.
        assert await backends_of(admin, login.role) >= 4

        child.process.send_signal(signal.SIGTERM)
        assert await child.exit_code(timeout=20) == 0, child.output
    stopped = [entry for entry in child.records if entry.get("message") == "stopped"]
    assert {entry["pid"] for entry in stopped} == worker_pids
    await eventually(lambda: pool_closed(admin, login.role), what="both workers' pools to close")


async def test_workers_refuse_a_port_another_process_holds(service_env, login):
    env = serve_env(service_env, login, grace=5, event_loop=None)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        env["ORDERSTREAM_PORT"] = port
        async with service_process(env, "serve", "--workers", "2") as child:
            assert await child.exit_code() == 2, child.output
    refused = await child.record(
        "cannot start: cannot listen on 127.0.0.1:" + port + ": " + "Address already in use"
    )
    assert refused["level"] == "ERROR"
    assert not [entry for entry in child.records if entry.get("message") == "serving"]


async def test_workers_refuse_a_port_a_running_service_shares(service_env, login):
    """A running service's acceptors share its port (SO_REUSEPORT); workers
    that share too must still not join them."""
    env = serve_env(service_env, login, grace=5, event_loop=None)
    async with running_app(service_env) as first:
        assert first.settings.acceptors > 1
        env["ORDERSTREAM_PORT"] = str(first.port)
        async with service_process(env, "serve", "--workers", "2") as child:
            assert await child.exit_code() == 2, child.output
    refused = await child.record(
        f"cannot start: cannot listen on 127.0.0.1:{first.port}: Address already in use"
    )
    assert refused["level"] == "ERROR"
    assert not [entry for entry in child.records if entry.get("message") == "serving"]
