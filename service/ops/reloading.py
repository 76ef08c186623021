"""Files that take effect again when they change, without a restart: the
tokens file and the listener's certificate, key and client CA.

A `WatchedFiles` holds one immutable value parsed from its files and swaps
it whole when their content changes, so a reader (the auth interceptor, the
TLS handshake's certificate fetcher) sees the old value or the new, never a
mix, and a call already admitted runs on untouched. Content is compared,
not inodes or mtimes: Kubernetes updates a Secret volume by swapping a
`..data` symlink, and a copied file may keep its old mtime. Files that do
not read or parse keep the value in force and are logged once as an error;
only at startup do they stop the service.

Two triggers: a poll every ORDERSTREAM_RELOAD_INTERVAL, so that a rotated
Secret (cert-manager, `kubectl`) takes effect with nobody acting, and
SIGHUP (`Reloader.reload_now`), so that an operator or a rotation hook need
not wait for the poll. Reading a few small files every few seconds costs
nothing worth a file-notification dependency, and inotify misses the
symlink swap unless the whole directory is watched.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

from service.errors import StartupError

log = logging.getLogger(__name__)

T = TypeVar("T")


def _digest(contents: Sequence[bytes]) -> bytes:
    """One digest for several files' content (kept instead of the content:
    a private key need not be held twice)."""
    digest = hashlib.sha256()
    for content in contents:
        digest.update(len(content).to_bytes(8, "big"))
        digest.update(content)
    return digest.digest()


class WatchedFiles(Generic[T]):
    """A value parsed from files, replaced when their content changes.

    `read` returns the files' content and `parse` the value; both raise
    StartupError, whose message names the file and never its content. The
    constructor reads and parses once, so bad files stop startup.
    """

    def __init__(
        self,
        what: str,
        read: Callable[[], Sequence[bytes]],
        parse: Callable[[Sequence[bytes]], T],
    ) -> None:
        self.what = what
        self._read = read
        self._parse = parse
        contents = read()
        self._value = parse(contents)
        # What the last check saw (a digest, or the error that stopped the
        # read), so that each new state is acted on and logged once.
        self._seen: bytes | str = _digest(contents)

    @property
    def current(self) -> T:
        return self._value

    def check(self) -> bool:
        """Reads the files again; True when a new value took effect."""
        try:
            contents = self._read()
        except StartupError as exc:
            self._refuse(str(exc), str(exc))
            return False
        seen = _digest(contents)
        if seen == self._seen:
            return False
        try:
            value = self._parse(contents)
        except StartupError as exc:
            self._refuse(seen, str(exc))
            return False
        self._seen = seen
        self._value = value
        log.info("reloaded", extra={"what": self.what})
        return True

    def _refuse(self, seen: bytes | str, error: str) -> None:
        if seen == self._seen:
            return
        self._seen = seen
        log.error(
            "reload refused",
            extra={"what": self.what, "error": error, "keeping": "the previous one in force"},
        )


class Reloader:
    """Checks its watched files every `interval` seconds, and at once when
    asked (SIGHUP)."""

    def __init__(self, watched: Sequence[WatchedFiles[Any]], interval: float) -> None:
        self._watched = tuple(watched)
        self._interval = interval
        self._wake = asyncio.Event()

    def reload_now(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval):
                    await self._wake.wait()
            self._wake.clear()
            for watched in self._watched:
                try:
                    watched.check()
                except Exception:
                    # A bug in a parser must not end reloading for good.
                    log.exception("reload failed", extra={"what": watched.what})
