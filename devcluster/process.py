"""A server as a real child process: `python -m service serve` (or any
server that logs the same JSON "serving" record with its port: the
benchmarks' ceiling and peer), its log lines read as they come.

The tests, the fault suite and the benchmarks all run theirs through
`ServiceProcess` (bench/ must not import tests/, hence here).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parents[1]


# What every service started here without caller authentication needs:
# without it the service refuses to serve (service/rpc/exposure.py).
INSECURE_DEV = {"ORDERSTREAM_INSECURE_DEV": "1"}


def service_argv(*args: str) -> list[str]:
    """The command line of `python -m service ARGS` in this interpreter."""
    return [sys.executable, "-m", "service", *args]


def process_env(service_env: dict[str, str], **overrides: str | None) -> dict[str, str]:
    """os.environ + the deployment's settings + overrides (None removes a variable)."""
    env = {**os.environ, **service_env}
    for name, value in overrides.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def json_records(lines: list[str]) -> list[dict[str, Any]]:
    """The JSON log records among some output lines."""
    found = []
    for line in lines:
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if isinstance(entry, dict):
                found.append(entry)
    return found


def proc_status_kib(pid: int, key: str) -> int:
    """A "kB" figure of /proc/PID/status, e.g. VmRSS or VmHWM."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


class ServiceProcess:
    """A running child and the lines it has logged so far (stderr, and
    stdout unless it was sent elsewhere). `keep` decides which lines are
    kept in `lines`: all of them unless told otherwise (a benchmark's
    access log is a line per call)."""

    def __init__(
        self, process: asyncio.subprocess.Process, keep: Callable[[str], bool] | None = None
    ) -> None:
        self.process = process
        self.lines: list[str] = []
        self._keep = keep
        self.serving: dict[str, Any] | None = None
        self._changed = asyncio.Event()
        self._readers = [
            asyncio.create_task(self._read(stream))
            for stream in (process.stderr, process.stdout)
            if stream is not None
        ]

    async def _read(self, stream: asyncio.StreamReader) -> None:
        async for raw in stream:
            line = raw.decode(errors="replace").rstrip("\n")
            if self._keep is None or self._keep(line):
                self.lines.append(line)
                self._changed.set()
        self._changed.set()

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def port(self) -> int:
        """The port of its "serving" record (see `wait_serving`)."""
        assert self.serving is not None, "not serving yet"
        return int(self.serving["port"])

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    @property
    def records(self) -> list[dict[str, Any]]:
        return json_records(self.lines)

    async def record(
        self, message: str, timeout: float = 15.0, *, after: int = 0
    ) -> dict[str, Any]:
        """Waits for the log record with this message, the first after the
        first `after` records (`len(records)` before an action: the record
        the action causes, not an earlier one like it)."""
        async with asyncio.timeout(timeout):
            while True:
                self._changed.clear()
                for entry in self.records[after:]:
                    if entry.get("message") == message:
                        return entry
                if all(reader.done() for reader in self._readers):
                    raise AssertionError(
                        f"the process ended without logging {message!r}:\n{self.output}"
                    )
                await self._changed.wait()

    async def wait_serving(self, timeout: float = 15.0) -> dict[str, Any]:
        """Waits for the "serving" record, which names the port(s)."""
        self.serving = await self.record("serving", timeout)
        return self.serving

    async def exit_code(self, timeout: float = 15.0) -> int:
        async with asyncio.timeout(timeout):
            code = await self.process.wait()
            await asyncio.gather(*self._readers)
        return code

    async def stop(self, timeout: float) -> int:
        """SIGTERM, then the exit code (TimeoutError if it takes longer)."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        return await self.exit_code(timeout)

    async def _reap(self) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
        await self.process.wait()
        await asyncio.gather(*self._readers)

    def rss_kib(self) -> int:
        return proc_status_kib(self.pid, "VmRSS")

    def peak_rss_kib(self) -> int:
        return proc_status_kib(self.pid, "VmHWM")


@contextlib.asynccontextmanager
async def spawned(
    argv: Sequence[str],
    env: dict[str, str],
    *,
    cwd: Path = REPO,
    stdout: int | IO[bytes] = subprocess.PIPE,
    keep: Callable[[str], bool] | None = None,
) -> AsyncIterator[ServiceProcess]:
    """Starts `argv` with exactly `env`; kills it if it is still running on
    exit. Its stdout is read as log lines unless `stdout` sends it elsewhere."""
    process = await asyncio.create_subprocess_exec(
        *argv,
        env=env,
        cwd=cwd,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=stdout,
        stderr=asyncio.subprocess.PIPE,
    )
    child = ServiceProcess(process, keep)
    try:
        yield child
    finally:
        await child._reap()


@contextlib.asynccontextmanager
async def service_process(
    env: dict[str, str], *args: str, cwd: Path = REPO, stdout: int | IO[bytes] = subprocess.PIPE
) -> AsyncIterator[ServiceProcess]:
    """`python -m service ARGS` with exactly `env` (see `process_env`)."""
    async with spawned(service_argv(*args), env, cwd=cwd, stdout=stdout) as child:
        yield child


@contextlib.asynccontextmanager
async def served(
    argv: Sequence[str],
    env: dict[str, str],
    *,
    ready_timeout: float = 60.0,
    stop_timeout: float = 60.0,
    keep: Callable[[str], bool] | None = None,
) -> AsyncIterator[ServiceProcess]:
    """A server started with `env` over os.environ, once it has logged
    "serving"; stopped with SIGTERM on exit unless the caller already
    stopped it."""
    async with spawned(argv, process_env(env), keep=keep) as child:
        await child.wait_serving(ready_timeout)
        yield child
        if child.process.returncode is None:
            await child.stop(stop_timeout)
