// The helpers against a real orderstream, which tests/test_client_node.py
// starts and names in ORDERSTREAM_* variables: writes with request ids,
// uploads under one upload id, mTLS and tokens, and a follow stream that
// outlives a SIGTERM of its service process.

import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { test } from "node:test";
import { Code } from "@connectrpc/connect";
import {
  consumeEvents,
  createOrder,
  createOrderstreamClients,
  publishEvents,
  streamEvents,
  updateOrderStatus,
  uploadEvents,
  uploadRequests,
} from "../index.js";
import { toBinary, create } from "@bufbuild/protobuf";
import { UploadEventsRequestSchema } from "../gen/orderstream/events/v1/event_service_pb.js";
import { OrderStatus } from "../gen/orderstream/orders/v1/order_pb.js";
import { newEvents, newOrder } from "../test-support/messages.js";

function env(name) {
  const value = process.env[name];
  assert.ok(value, `set ${name}: run this suite through tests/test_client_node.py`);
  return value;
}

const plain = () => createOrderstreamClients(env("ORDERSTREAM_URL"));

async function read(events, options) {
  const found = [];
  for await (const event of streamEvents(events, options)) found.push(event);
  return found;
}

test("uploadRequests stay under the byte budget", async () => {
  const events = newEvents("budget", 0, 300, "x".repeat(20));
  const requests = [];
  for await (const request of uploadRequests(events, "budget-1", 1024)) requests.push(request);
  assert.ok(requests.length > 10);
  for (const request of requests) {
    assert.ok(toBinary(UploadEventsRequestSchema, create(UploadEventsRequestSchema, request)).length <= 1024);
  }
  assert.deepEqual(requests.map((r) => r.uploadId), ["budget-1", ...Array(requests.length - 1).fill("")]);
  assert.deepEqual(requests.flatMap((r) => r.events), events);
  const empty = [];
  for await (const request of uploadRequests([], "empty-1")) empty.push(request);
  assert.deepEqual(empty, [{ uploadId: "empty-1", events: [] }]);
});

test("uploadEvents writes once under one upload id, and streamEvents reads it back", async () => {
  const { events } = plain();
  const subject = `/node/upload/${randomUUID()}`;
  async function* generated() {
    yield* newEvents(subject, 0, 200);
  }
  const first = await uploadEvents(events, generated(), { uploadId: subject, maxBytes: 2048 });
  const again = await uploadEvents(events, newEvents(subject, 0, 200), { uploadId: subject });
  assert.equal(first.eventCount, 200n);
  assert.equal(again.firstEventId, first.firstEventId);
  const received = await read(events, { subject });
  assert.deepEqual(
    received.map((event) => JSON.parse(event.payload.value).n),
    [...Array(200).keys()],
  );
  const after = await read(events, { subject, afterId: received[149].id });
  assert.deepEqual(after.map((event) => event.id), received.slice(150).map((event) => event.id));
});

test("the write helpers send request ids", async () => {
  const { orders, events } = plain();
  const subject = `/node/publish/${randomUUID()}`;
  const requestId = `publish-${randomUUID()}`;
  const first = await publishEvents(events, newEvents(subject, 0, 3), { requestId });
  const again = await publishEvents(events, newEvents(subject, 0, 3), { requestId });
  assert.deepEqual(again, first);
  const order = await createOrder(orders, newOrder(`node-${randomUUID()}`));
  assert.equal(order.status, OrderStatus.PENDING);
  const key = `status-${randomUUID()}`;
  // Without the key, the repeat would be FAILED_PRECONDITION (PAID is entered once).
  for (let attempt = 0; attempt < 2; attempt++) {
    const paid = await updateOrderStatus(orders, order.id, OrderStatus.PAID, { requestId: key });
    assert.equal(paid.status, OrderStatus.PAID);
  }
});

test("mTLS with a known certificate, and a token for an unknown one", async () => {
  const url = `https://${env("ORDERSTREAM_TLS_TARGET")}`;
  const caFile = env("ORDERSTREAM_CA_FILE");
  const known = createOrderstreamClients(url, {
    caFile,
    certFile: env("ORDERSTREAM_CLIENT_CERT"),
    keyFile: env("ORDERSTREAM_CLIENT_KEY"),
  });
  assert.ok((await createOrder(known.orders, newOrder(`node-${randomUUID()}`))).id > 0n);
  const stranger = {
    caFile,
    certFile: env("ORDERSTREAM_STRANGER_CERT"),
    keyFile: env("ORDERSTREAM_STRANGER_KEY"),
  };
  await assert.rejects(
    createOrder(createOrderstreamClients(url, stranger).orders, newOrder("node-stranger")),
    (error) => error.code === Code.Unauthenticated,
  );
  const withToken = createOrderstreamClients(url, { ...stranger, token: env("ORDERSTREAM_TOKEN") });
  assert.ok((await createOrder(withToken.orders, newOrder(`node-${randomUUID()}`))).id > 0n);
});

// Every ackEvery events the last processed one is acknowledged: a consumer
// that stops at the 7th of 12 events (5 acknowledged) has the next one
// start at the 6th, with no gap, and one that reaches the live end is
// acknowledged that far.
test("consumeEvents resumes after what it acknowledged", async () => {
  const { events } = plain();
  const consumer = `node-consumer-${randomUUID()}`;
  const subject = `/node/consume/${randomUUID()}`;
  const ids = await publishEvents(events, newEvents(subject, 0, 12));
  const position = async () => (await events.getConsumer({ name: consumer })).position;
  const received = [];
  for await (const event of consumeEvents(events, consumer, { subject, ackEvery: 5 })) {
    received.push(event.id);
    if (received.length === 7) break;
  }
  assert.deepEqual(received, ids.slice(0, 7));
  assert.equal(await position(), ids[4]);

  const stop = new AbortController();
  const resumed = [];
  const following = (async () => {
    for await (const event of consumeEvents(events, consumer, { subject, ackEvery: 5, signal: stop.signal })) {
      resumed.push(event.id);
    }
  })();
  following.catch(() => {}); // awaited below, once stopped
  const deadline = Date.now() + 30_000;
  while ((await position()) !== ids[11]) {
    assert.ok(Date.now() < deadline, "the live end is acknowledged");
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  stop.abort();
  await assert.rejects(following, (error) => error.name === "AbortError" || error.code === Code.Canceled);
  assert.deepEqual(resumed, ids.slice(5));
});

// Publishes under one request id until a process takes the events: the
// helper retries UNAVAILABLE, and a call that the draining process ends
// CANCELLED may or may not have been written, so it is repeated too (the
// server answers a repeat with the first call's ids).
async function publishUntilTaken(events, batch) {
  const requestId = `publish-${randomUUID()}`;
  for (;;) {
    try {
      return await publishEvents(events, batch, { requestId, attempts: 30 });
    } catch (error) {
      if (error.code !== Code.Canceled) throw error;
    }
  }
}

// After 10 events the service process is sent SIGTERM (it ends the stream
// UNAVAILABLE), 15 more are published meanwhile, and the test server
// starts a new process on the same port: all 35 arrive, once each, in order.
test("a follow stream survives a SIGTERM of its service process", async () => {
  const { events } = createOrderstreamClients(`http://${env("ORDERSTREAM_RESTART_TARGET")}`);
  const subject = `/node/follow/${randomUUID()}`;
  const published = await publishEvents(events, newEvents(subject, 0, 20));
  let later;
  const received = [];
  // reconnects: each failed attempt waits up to 2 s, and a new service
  // process takes a few seconds to serve on this shared machine.
  for await (const event of streamEvents(events, { subject, follow: true, reconnects: 30 })) {
    received.push(event.id);
    if (received.length === 10) {
      process.kill(Number(env("ORDERSTREAM_RESTART_PID")), "SIGTERM");
      later = publishUntilTaken(events, newEvents(subject, 20, 15));
      later.catch(() => {}); // awaited below, once the stream has its 35
    }
    if (received.length === 35) break;
  }
  published.push(...(await later));
  assert.deepEqual(received, published);
});
