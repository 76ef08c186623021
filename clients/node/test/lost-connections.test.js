// The retries against the real orderstream (ORDERSTREAM_URL, from
// tests/test_client_node.py), through a TCP proxy that loses a connection
// the way networks do: the default service config, uploadEvents and
// streamEvents each carry a call over a connection lost under it.

import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { test } from "node:test";
import { Code } from "@connectrpc/connect";
import { createOrder, createOrderstreamClients, publishEvents, streamEvents, uploadEvents } from "../index.js";
import { newEvents, newOrder } from "../test-support/messages.js";
import { tcpProxy } from "../test-support/tcp-proxy.js";

const url = process.env.ORDERSTREAM_URL;
assert.ok(url, "set ORDERSTREAM_URL: run this suite through tests/test_client_node.py");
const direct = createOrderstreamClients(url);

/** A proxy in front of the service for the test's length; `use` gets it. */
async function throughProxy(use) {
  const proxy = await tcpProxy(Number(new URL(url).port));
  try {
    return await use(proxy);
  } finally {
    await proxy.close();
  }
}

async function readBack(subject) {
  const found = [];
  for await (const event of streamEvents(direct.events, { subject })) found.push(event);
  return found;
}

// `call` is sent into a blackhole; once its request has wholly left the
// client, every connection is reset: the request was lost on its way, and
// only a new attempt on a new connection can answer it.
async function lostOnItsWay(proxy, call) {
  proxy.blackhole();
  const sent = proxy.requestSent();
  const answer = call();
  answer.catch(() => {}); // awaited by the caller
  await sent;
  proxy.cut();
  return answer;
}

test("a read lost on its way is retried by the service config, and fails UNAVAILABLE without it", async () => {
  const order = await createOrder(direct.orders, newOrder(`node-${randomUUID()}`));
  await throughProxy(async (proxy) => {
    for (const [serviceConfig, retried] of [[undefined, true], [{}, false]]) {
      const { orders } = createOrderstreamClients(proxy.url, { serviceConfig });
      // Connected first, so that the blackhole takes the request itself.
      assert.equal((await orders.getOrder({ id: order.id })).id, order.id);
      const before = proxy.connections;
      const reading = lostOnItsWay(proxy, () => orders.getOrder({ id: order.id }));
      if (retried) {
        assert.equal((await reading).id, order.id);
        assert.ok(proxy.connections > before, "the retry's new connection");
      } else {
        await assert.rejects(reading, (error) => error.code === Code.Unavailable);
      }
    }
  });
});

test("uploadEvents cut midway is retried and writes every event once", async () => {
  const subject = `/node/upload-cut/${randomUUID()}`;
  await throughProxy(async (proxy) => {
    const { events } = createOrderstreamClients(proxy.url);
    async function* generated() {
      for (let n = 0; n < 400; n++) {
        if (n === 200) proxy.cut();
        yield* newEvents(subject, n, 1, "x".repeat(200));
      }
    }
    const uploaded = await uploadEvents(events, generated(), { maxBytes: 4096 });
    assert.equal(uploaded.eventCount, 400n);
    assert.ok(proxy.connections >= 2, "the upload was sent again on a new connection");
  });
  const stored = await readBack(subject);
  assert.deepEqual(
    stored.map((event) => JSON.parse(event.payload.value).n),
    [...Array(400).keys()],
  );
});

// Node learns of a reset connection from its socket's error, of one closed
// in order from its socket's end: each takes its own way to the call.
for (const [how, lose] of [
  ["reset", (proxy) => proxy.cut()],
  ["closed in order", (proxy) => proxy.end()],
]) {
  test(`streamEvents resumes after its connection is ${how}, with no gap and no duplicate`, async () => {
    const subject = `/node/stream-cut/${randomUUID()}`;
    const published = await publishEvents(direct.events, newEvents(subject, 0, 50));
    const received = [];
    await throughProxy(async (proxy) => {
      const { events } = createOrderstreamClients(proxy.url);
      for await (const event of streamEvents(events, { subject, follow: true })) {
        received.push(event.id);
        if (received.length === 10) {
          lose(proxy);
          // Written while the stream is cut off: the resumed stream must
          // pick them up exactly once.
          published.push(...(await publishEvents(direct.events, newEvents(subject, 50, 25))));
        }
        if (received.length === published.length) break;
      }
      assert.ok(proxy.connections >= 2, "the stream was opened again on a new connection");
    });
    assert.deepEqual(received, published);
  });
}
