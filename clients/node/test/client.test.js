// Runs against a real orderstream: ORDERSTREAM_URL (e.g. http://127.0.0.1:50051)
// names it. tests/test_client_node.py starts one and runs `node --test` here.

import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { test } from "node:test";
import { Code, ConnectError } from "@connectrpc/connect";
import { createOrderstreamClients } from "../client.js";
import { OrderStatus } from "../gen/orderstream/orders/v1/order_pb.js";

const url = process.env.ORDERSTREAM_URL;
assert.ok(url, "set ORDERSTREAM_URL to the service's base URL");
const { orders, events } = createOrderstreamClients(url);

function newOrder(customerId, n = 1) {
  return {
    requestId: randomUUID(),
    customerId,
    currency: "EUR",
    items: [{ sku: `SKU-${n}`, quantity: n, unitPriceCents: 100n }],
  };
}

test("creates an order and gets it back", async () => {
  const request = newOrder(`node-${randomUUID()}`, 3);
  const created = await orders.createOrder(request);
  assert.ok(created.id > 0n);
  assert.equal(created.totalCents, 300n);
  assert.equal(created.status, OrderStatus.PENDING);
  const again = await orders.createOrder(request);
  assert.equal(again.id, created.id, "the request id makes creation idempotent");
  const fetched = await orders.getOrder({ id: created.id });
  assert.equal(fetched.id, created.id);
  assert.deepEqual(fetched.items, created.items);
});

test("a missing order is NOT_FOUND", async () => {
  await assert.rejects(orders.getOrder({ id: 2n ** 62n }), (error) => {
    assert.ok(error instanceof ConnectError);
    assert.equal(error.code, Code.NotFound);
    return true;
  });
});

test("lists a customer's orders page by page", async () => {
  const customerId = `node-${randomUUID()}`;
  const ids = [];
  for (let n = 1; n <= 5; n++) {
    ids.push((await orders.createOrder(newOrder(customerId, n))).id);
  }
  const seen = [];
  let pageToken = "";
  let pages = 0;
  do {
    const page = await orders.listOrders({ customerId, pageSize: 2, pageToken });
    seen.push(...page.orders.map((order) => order.id));
    pageToken = page.nextPageToken;
    pages++;
  } while (pageToken);
  assert.deepEqual(seen, ids);
  assert.equal(pages, 3);
});

test("uploads events with client streaming and reads them back with server streaming", async () => {
  const source = `/node/${randomUUID()}`;
  async function* requests() {
    for (let batch = 0; batch < 3; batch++) {
      yield {
        uploadId: batch === 0 ? source : "",
        events: Array.from({ length: 4 }, (_, n) => ({
          type: "test.node",
          source,
          subject: source,
          payload: { case: "jsonPayload", value: JSON.stringify({ n: batch * 4 + n }) },
        })),
      };
    }
  }
  const uploaded = await events.uploadEvents(requests());
  assert.equal(uploaded.eventCount, 12n);

  const received = [];
  for await (const response of events.streamEvents({ subject: source })) {
    received.push(...response.events);
  }
  assert.deepEqual(
    received.map((event) => JSON.parse(event.payload.value).n),
    [...Array(12).keys()],
  );
  assert.equal(received[0].id, uploaded.firstEventId);
  assert.equal(received.at(-1).id, uploaded.lastEventId);
});
