// A TCP proxy between a client and the real service that a test breaks as
// networks break (tests/support/tcp_proxy.py is the Python suite's):
// blackhole() silently drops every byte both ways from then on; cut()
// resets every open connection (an RST, no FIN), end() closes each in
// order (a FIN, as a process that exits does), and either lets bytes flow
// again on the connections that follow, as a dropped connection, not a
// dead host, does. It reads the HTTP/2 frames clients send, so that a
// test can wait until a request has wholly left its client
// (requestSent()) before losing it.

import { once } from "node:events";
import net from "node:net";

// Every HTTP/2 connection opens with this preface, then frames follow,
// each behind a 9-byte header: length (3 bytes), type, flags, stream id.
const PREFACE_BYTES = 24;
const FRAME_HEADER_BYTES = 9;
const DATA = 0x0;
const HEADERS = 0x1;
const END_STREAM = 0x1;

/** Calls `onRequestSent` for each frame that ends a request's half of its stream. */
function requestEnds(onRequestSent) {
  let prefaceLeft = PREFACE_BYTES;
  let buffered = Buffer.alloc(0);
  return (chunk) => {
    buffered = Buffer.concat([buffered, chunk]);
    const skipped = Math.min(prefaceLeft, buffered.length);
    [buffered, prefaceLeft] = [buffered.subarray(skipped), prefaceLeft - skipped];
    while (buffered.length >= FRAME_HEADER_BYTES) {
      const frameBytes = FRAME_HEADER_BYTES + buffered.readUIntBE(0, 3);
      if (buffered.length < frameBytes) break;
      const [type, flags] = [buffered[3], buffered[4]];
      if ((type === DATA || type === HEADERS) && flags & END_STREAM) onRequestSent();
      buffered = buffered.subarray(frameBytes);
    }
  };
}

/** Listens on a loopback port in front of `upstreamPort`. */
export async function tcpProxy(upstreamPort, host = "127.0.0.1") {
  const open = new Set();
  let blackholed = false;
  let waiters = [];
  const requestSent = () => {
    for (const resolve of waiters) resolve();
    waiters = [];
  };

  function closeEvery(close) {
    for (const socket of open) close(socket);
    open.clear();
    blackholed = false;
  }

  const server = net.createServer((client) => {
    proxy.connections++;
    const upstream = net.connect(upstreamPort, host);
    const sent = requestEnds(requestSent);
    for (const [from, to] of [[client, upstream], [upstream, client]]) {
      open.add(from);
      from.on("data", (chunk) => {
        if (from === client) sent(chunk);
        if (!blackholed) to.write(chunk);
      });
      // Either side ending or failing ends the other: a reset is passed on
      // as a reset, an orderly end as an end.
      from.on("end", () => to.end());
      from.on("error", () => to.resetAndDestroy());
      from.on("close", () => open.delete(from));
    }
  });
  server.listen(0, host);
  await once(server, "listening");

  const proxy = {
    url: `http://${host}:${server.address().port}`,
    /** Connections accepted so far. */
    connections: 0,
    /** From now on, every byte either side sends is dropped. */
    blackhole() {
      blackholed = true;
    },
    /** Resets every open connection; bytes flow again on new ones. */
    cut: () => closeEvery((socket) => socket.resetAndDestroy()),
    /** Closes every open connection in order; bytes flow again on new ones. */
    end: () => closeEvery((socket) => socket.end()),
    /** Resolves once the next request has wholly passed (or been dropped). */
    requestSent: () => new Promise((resolve) => waiters.push(resolve)),
    async close() {
      const closed = new Promise((resolve) => server.close(resolve));
      proxy.cut();
      await closed;
    },
  };
  return proxy;
}
