// The default service config: the same table as Python's, carried out by
// withServiceConfig against a bare server that fails on demand.

import assert from "node:assert/strict";
import { test } from "node:test";
import { Code, ConnectError } from "@connectrpc/connect";
import { createOrderstreamClients, DEFAULT_SERVICE_CONFIG, publishEvents } from "../index.js";
import { flakyServer } from "../test-support/flaky-server.js";

const failing = (code, times, answer) => {
  const calls = { count: 0, timeouts: [] };
  const handler = async function* (request, context) {
    calls.count++;
    calls.timeouts.push(context.timeoutMs());
    if (calls.count <= times) throw new ConnectError("flaky", code);
    yield* answer(request);
  };
  return { calls, handler };
};

const once = (make) => async function* (request) {
  yield make(request);
};

test("the service config is Python's", () => {
  const python = process.env.ORDERSTREAM_PYTHON_SERVICE_CONFIG;
  assert.ok(python, "set ORDERSTREAM_PYTHON_SERVICE_CONFIG");
  assert.deepEqual(DEFAULT_SERVICE_CONFIG, JSON.parse(python));
});

test("reads are retried on UNAVAILABLE and ABORTED with the config's timeout", async () => {
  const unavailable = failing(Code.Unavailable, 2, once((r) => ({ id: r.id })));
  const aborted = failing(Code.Aborted, 1, once(() => ({ orders: [] })));
  const server = await flakyServer({
    orders: {
      getOrder: async (request, context) => {
        for await (const order of unavailable.handler(request, context)) return order;
      },
      listOrders: async (request, context) => {
        for await (const page of aborted.handler(request, context)) return page;
      },
    },
  });
  try {
    const { orders } = createOrderstreamClients(server.url);
    assert.equal((await orders.getOrder({ id: 7n })).id, 7n);
    assert.equal(unavailable.calls.count, 3);
    // "10s", as the server sees it when the call arrives.
    assert.ok(unavailable.calls.timeouts.every((ms) => ms > 9000 && ms <= 10000));
    await orders.listOrders({});
    assert.equal(aborted.calls.count, 2);
  } finally {
    await server.close();
  }
});

test("PublishEvents is not retried by the config, publishEvents retries under one key", async () => {
  const keys = [];
  let calls = 0;
  const server = await flakyServer({
    events: {
      publishEvents: async (request) => {
        keys.push(request.requestId);
        if (++calls <= 2) throw new ConnectError("flaky", Code.Unavailable);
        return { ids: [1n] };
      },
    },
  });
  try {
    const { events } = createOrderstreamClients(server.url);
    await assert.rejects(events.publishEvents({ events: [{}] }), (e) => e.code === Code.Unavailable);
    assert.equal(calls, 1);
    assert.deepEqual(await publishEvents(events, [{}]), [1n]);
    assert.equal(calls, 3);
    assert.equal(keys[1], keys[2]);
    assert.match(keys[1], /^publish-[0-9a-f]{32}$/);
  } finally {
    await server.close();
  }
});

test("UpdateOrderStatus is not retried on ABORTED, a stream is retried before its first message", async () => {
  let updates = 0;
  const stream = failing(Code.Unavailable, 2, async function* () {
    yield { events: [{ id: 1n }] };
    yield { events: [{ id: 2n }] };
  });
  const server = await flakyServer({
    orders: {
      updateOrderStatus: async () => {
        updates++;
        throw new ConnectError("stale", Code.Aborted);
      },
    },
    events: { streamEvents: stream.handler },
  });
  try {
    const { orders, events } = createOrderstreamClients(server.url);
    await assert.rejects(orders.updateOrderStatus({ id: 1n }), (e) => e.code === Code.Aborted);
    assert.equal(updates, 1);
    const ids = [];
    for await (const response of events.streamEvents({})) ids.push(...response.events.map((e) => e.id));
    assert.deepEqual(ids, [1n, 2n]);
    assert.equal(stream.calls.count, 3);
    assert.deepEqual(stream.calls.timeouts, [undefined, undefined, undefined], "streams get no timeout");
  } finally {
    await server.close();
  }
});

test("options that cannot go together are refused", () => {
  assert.throws(() => createOrderstreamClients("http://localhost:1", { token: "t" }), /https only/);
  assert.throws(() => createOrderstreamClients("http://localhost:1", { caFile: "ca.crt" }), /no certificates/);
  assert.throws(() => createOrderstreamClients("https://localhost:1", { certFile: "c.crt" }), /go together/);
});
