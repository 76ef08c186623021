"""Running a command line through the shell, from the repository root."""

from __future__ import annotations

import asyncio
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


async def run_shell(command: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_shell(
        command,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    return process.returncode or 0, out.decode(), err.decode()
