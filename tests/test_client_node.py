"""The Node client (clients/node) against the real service: its own tests
under `node --test` (the session's service, directly and through a TCP
proxy that cuts connections, a closed mTLS one that takes tokens, and a
service process that its follow test stops with SIGTERM), and the example
program."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from orderstream.client import DEFAULT_SERVICE_CONFIG
from tests.support.client_servers import restarted_after_sigterm, secured_service

REPO = Path(__file__).resolve().parents[1]
NODE_CLIENT = REPO / "clients" / "node"


async def run_node(*args: str, env: dict[str, str]) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        "node",
        *args,
        cwd=NODE_CLIENT,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await process.communicate()
    return process.returncode or 0, out.decode()


# The follow test waits for a service process to stop and another to serve.
@pytest.mark.timeout(300)
async def test_node_client_suite_passes(app, service_env, tmp_path):
    async with (
        secured_service(service_env, tmp_path) as secured,
        restarted_after_sigterm(service_env) as restarting,
    ):
        code, out = await run_node(
            "--test",
            # A hang fails its test with a message instead of the whole run.
            "--test-timeout=120000",
            "test/",
            env={
                "ORDERSTREAM_URL": f"http://127.0.0.1:{app.port}",
                "ORDERSTREAM_PYTHON_SERVICE_CONFIG": json.dumps(DEFAULT_SERVICE_CONFIG),
                **secured,
                **restarting.client_env(),
            },
        )
        assert code == 0, out
        # The follow test's SIGTERM was graceful and the port served again.
        assert await restarting.first.exit_code() == 0, restarting.first.output
        assert restarting.second.done(), out
    assert "# fail 0" in out
    assert "# pass 21" in out


async def test_node_example_runs(app):
    url = f"http://127.0.0.1:{app.port}"
    code, out = await run_node("example.js", url, env={})
    assert code == 0, out
    assert "status PENDING" in out
    assert ": order.created {" in out
