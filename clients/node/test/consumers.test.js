// consumeEvents against a bare server that breaks its stream on demand:
// what each stream asks for, and what is acknowledged when.

import assert from "node:assert/strict";
import { test } from "node:test";
import { Code, ConnectError } from "@connectrpc/connect";
import { consumeEvents, createOrderstreamClients } from "../index.js";
import { flakyServer } from "../test-support/flaky-server.js";

const event = (id) => ({ id, type: "t", source: "s", subject: "s" });

test("consumeEvents reopens a broken stream after what it acknowledged", async () => {
  const requests = [];
  const acks = [];
  const server = await flakyServer({
    events: {
      async *streamEvents(request) {
        requests.push(request);
        if (requests.length === 1) {
          yield { events: [event(1n), event(2n), event(3n)] };
          throw new ConnectError("connection lost", Code.Unavailable);
        }
        // The service starts again after the acknowledged position (2).
        yield { events: [event(3n), event(4n)] };
        yield { progress: { position: 10n } };
      },
      async ackEvents(request) {
        acks.push([request.consumer, request.member, request.position]);
        return { position: request.position };
      },
    },
  });
  try {
    const { events } = createOrderstreamClients(server.url);
    const received = [];
    for await (const e of consumeEvents(events, "billing", { member: "m1", types: ["t"], ackEvery: 2 })) {
      received.push(e.id);
    }
    // At least once: the 3rd was processed but not acknowledged when the
    // stream broke, so it comes again.
    assert.deepEqual(received, [1n, 2n, 3n, 3n, 4n]);
    assert.deepEqual(acks, [
      ["billing", "m1", 2n],
      ["billing", "m1", 3n],
      ["billing", "m1", 10n], // the progress message
    ]);
    assert.equal(requests.length, 2);
    for (const request of requests) {
      assert.equal(request.consumer, "billing");
      assert.equal(request.member, "m1");
      assert.deepEqual(request.types, ["t"]);
      assert.equal(request.afterId, 0n);
      assert.ok(request.follow && request.progress);
    }
  } finally {
    await server.close();
  }
});

test("consumeEvents does not reopen a stream that failed otherwise", async () => {
  let calls = 0;
  const server = await flakyServer({
    events: {
      async *streamEvents() {
        calls++;
        throw new ConnectError("no such thing", Code.InvalidArgument);
      },
    },
  });
  try {
    const { events } = createOrderstreamClients(server.url);
    await assert.rejects(
      (async () => {
        for await (const _ of consumeEvents(events, "billing")) assert.fail("an event");
      })(),
      (error) => error.code === Code.InvalidArgument,
    );
    assert.equal(calls, 1);
  } finally {
    await server.close();
  }
});
