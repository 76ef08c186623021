"""A TCP proxy a test can break in the two ways networks break.

`cut()` resets every open connection at once (an RST, no FIN), and new ones
are accepted as before: a dropped connection, not a dead host.
`blackhole()` keeps every socket open but silently drops the bytes in both
directions, new connections included, until `resume()`: a stalled network,
where nothing fails until somebody's timeout does. Nothing that happens
behind it shows either: a side that closes, or an upstream that refuses,
leaves the other side open and silent, as a host that died behind a
partition would, until `resume()` resets it, as the healed network carries
the closed side's answer (an RST) to whatever the open side sends. Dropped
bytes stay dropped, so a TLS session that lost some is broken for good
after `resume()`.
`repoint()` sends new connections to another port and leaves open ones
where they are: a DNS name or an endpoint flipped to another server.
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType


class TcpProxy:
    def __init__(self, upstream_port: int, host: str = "127.0.0.1") -> None:
        self._upstream = (host, upstream_port)
        self._host = host
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        # Sides left open while blackholed although their other side ended.
        self._orphans: set[asyncio.StreamWriter] = set()
        self._pipes: set[asyncio.Task[None]] = set()
        self._blackholed = False
        self.port = 0
        self.connections = 0

    async def __aenter__(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._accept, self._host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()
        self.cut()
        await asyncio.gather(*self._pipes, return_exceptions=True)

    def cut(self) -> None:
        """Aborts every proxied connection on both sides (an RST, no FIN)."""
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()
        self._orphans.clear()

    def repoint(self, upstream_port: int) -> None:
        """New connections go to `upstream_port` from now on; open ones stay."""
        self._upstream = (self._upstream[0], upstream_port)

    def blackhole(self) -> None:
        """From now on, every byte either side sends is dropped."""
        self._blackholed = True

    def resume(self) -> None:
        """Bytes flow again (what was dropped meanwhile is not replayed), and
        each side whose other side ended meanwhile is reset."""
        self._blackholed = False
        for writer in self._orphans:
            self._writers.discard(writer)
            writer.transport.abort()
        self._orphans.clear()

    async def _accept(
        self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter
    ) -> None:
        self.connections += 1
        try:
            server_in, server_out = await asyncio.open_connection(*self._upstream)
        except OSError:
            if self._blackholed:
                self._hold_silently(client_in, client_out)
            else:
                client_out.transport.abort()
            return
        self._writers |= {client_out, server_out}
        for reader, writer in ((client_in, server_out), (server_in, client_out)):
            pipe = asyncio.create_task(self._pipe(reader, writer))
            self._pipes.add(pipe)
            pipe.add_done_callback(self._pipes.discard)

    def _hold_silently(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Keeps a client's connection open, reading and dropping what it
        sends, until `resume()`, `cut()` or the proxy's end."""
        self._writers.add(writer)
        self._orphans.add(writer)
        hold = asyncio.create_task(self._drop(reader))
        self._pipes.add(hold)
        hold.add_done_callback(self._pipes.discard)

    @staticmethod
    async def _drop(reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(OSError):
            while await reader.read(1 << 16):
                pass

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(1 << 16):
                if self._blackholed:
                    continue
                writer.write(data)
                await writer.drain()
        except OSError:
            pass  # the other side was cut: this direction ends too
        finally:
            # The end of one side does not reach the other through a
            # blackhole: it stays open, silent, until resume() or cut().
            if self._blackholed and writer in self._writers:
                self._orphans.add(writer)
            else:
                self._writers.discard(writer)
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
