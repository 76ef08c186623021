"""The Node client (clients/node) against the real service: its own tests
under `node --test`, and the example program."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NODE_CLIENT = REPO / "clients" / "node"


async def run_node(*args: str, url: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        "node",
        *args,
        cwd=NODE_CLIENT,
        env={**os.environ, "ORDERSTREAM_URL": url},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await process.communicate()
    return process.returncode or 0, out.decode()


async def test_node_client_suite_passes(app):
    code, out = await run_node("--test", "test/", url=f"http://127.0.0.1:{app.port}")
    assert code == 0, out
    assert "# fail 0" in out
    assert "# pass 4" in out


async def test_node_example_runs(app):
    url = f"http://127.0.0.1:{app.port}"
    code, out = await run_node("example.js", url, url=url)
    assert code == 0, out
    assert "status PENDING" in out
    assert ": order.created {" in out
