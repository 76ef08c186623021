"""One JSON object per log line, with whatever `extra` fields a call adds.

Every line carries the process id (several workers share one stream) and,
inside an RPC, the call's request id, so an error logged deep in a handler
can be matched with the caller's request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from contextvars import ContextVar

# Set by the interceptor for the task that runs one call.
request_id: ContextVar[str | None] = ContextVar("request_id", default=None)
# Who the call's credentials say it is (a token's name), set by
# authentication in the call's task; never a secret.
caller: ContextVar[str | None] = ContextVar("caller", default=None)

# Attributes every LogRecord has; anything else came in through `extra`.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        current_request = request_id.get()
        if current_request is not None:
            entry["request_id"] = current_request
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


# The handler `configure` installed, which access lines bypass logging to reach.
_json_handler: logging.StreamHandler | None = None  # type: ignore[type-arg]


def configure(level: str) -> None:
    global _json_handler
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    _json_handler = handler


class AccessLog:
    """One JSON line per finished call, the same line `JsonFormatter` would
    write for `logging.getLogger("service.access").info("rpc", extra=...)`.

    Through logging that line cost more than a database point read (about
    80 µs of server CPU per GetOrder on the benchmark machine: the caller's
    frame looked up, a LogRecord, a lock and a write system call per line).
    Here a call only records its fields; the lines are built and written
    together: every `FLUSH_INTERVAL` (50 ms), or as soon as `FLUSH_CALLS`
    (512) wait, or at `flush` (the server's stop calls it). Building each
    line in the call, even with the write deferred, cost GetOrder 10-12%
    of its calls a second at 16 in flight against building them at the
    flush (docs/benchmarks.md#the-access-line). So an access line may reach the
    log up to 50 ms after the lines other loggers wrote meanwhile; each
    carries the time its call ended. Without `configure` (the service
    embedded, as in the tests) it goes through logging, at once.
    """

    FLUSH_INTERVAL = 0.05
    # At most this many calls wait: a bound on memory (a caller's request
    # id is at most 128 characters) and on how long one flush holds the loop.
    FLUSH_CALLS = 512

    def __init__(self) -> None:
        self._logger = logging.getLogger("service.access")
        self._pid = os.getpid()
        # (time, method, code, seconds, request id, caller) of each call
        self._pending: list[tuple[float, str, str, float, str | None, str | None]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._second = -1
        self._stamp = ""

    def rpc(
        self, method: str, code: str, seconds: float, request: str | None, caller: str | None
    ) -> None:
        """`caller`: the token's name or the client certificate's subject,
        None for an anonymous call."""
        if not self._logger.isEnabledFor(logging.INFO):
            return
        if _json_handler is None:
            self._logger.info(
                "rpc",
                extra={
                    "method": method,
                    "code": code,
                    "duration_ms": round(seconds * 1000, 3),
                    "caller": caller,
                },
            )
            return
        self._pending.append((time.time(), method, code, seconds, request, caller))
        if len(self._pending) >= self.FLUSH_CALLS:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.FLUSH_INTERVAL, self.flush)

    def _line(
        self,
        now: float,
        method: str,
        code: str,
        seconds: float,
        request: str | None,
        caller: str | None,
    ) -> str:
        return json.dumps(
            {
                "time": self._time(now),
                "level": "INFO",
                "logger": "service.access",
                "message": "rpc",
                "pid": self._pid,
                "request_id": request,
                "method": method,
                "code": code,
                "duration_ms": round(seconds * 1000, 3),
                "caller": caller,
            }
        )

    def _time(self, now: float) -> str:
        whole = int(now)
        if whole != self._second:
            self._second = whole
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
        return f"{self._stamp}.{int((now - whole) * 1000):03d}Z"

    def flush(self) -> None:
        """Writes a line for every call still waiting."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        handler = _json_handler
        if not self._pending or handler is None:
            return
        calls, self._pending = self._pending, []
        text = "\n".join([self._line(*call) for call in calls]) + "\n"
        with handler.lock:  # type: ignore[union-attr]
            handler.stream.write(text)
            handler.flush()
