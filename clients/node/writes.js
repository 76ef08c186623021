// The unary writes with an idempotency key always set, so that a retry
// after a lost response returns the first result instead of writing again.

import { Code, ConnectError } from "@connectrpc/connect";
import { backoff, newRequestId, sleep } from "./retry.js";

// Codes after which the call may or may not have taken effect, or was
// refused before doing anything, and a repeat with the same key is
// answered with the first result: worth another attempt.
const RETRIED = new Set([Code.Unavailable, Code.Aborted]);

/**
 * Publishes `events` (1..1000) in one PublishEvents call; resolves to their
 * ids in order. The call always carries a `requestId` (a fresh one when
 * unset), and on UNAVAILABLE or ABORTED it is sent again with that same
 * key, up to `attempts` times: the server answers a repeat with the first
 * call's ids and writes nothing. Other errors are thrown as they are.
 *
 *   const ids = await publishEvents(events, [{ type: "com.example.paid", source: "/billing" }]);
 */
export async function publishEvents(client, events, { requestId, attempts = 5, timeoutMs } = {}) {
  if (attempts < 1) throw new Error("publishEvents: attempts must be at least 1");
  const request = { requestId: requestId || newRequestId("publish"), events };
  for (let attempt = 1; ; attempt++) {
    try {
      return (await client.publishEvents(request, { timeoutMs })).ids;
    } catch (error) {
      if (!RETRIED.has(ConnectError.from(error).code) || attempt === attempts) throw error;
    }
    await sleep(backoff(attempt));
  }
}

/**
 * CreateOrder with a fresh `requestId` when `request` has none (the server
 * requires one); the service config retries it.
 */
export function createOrder(client, request, callOptions) {
  return client.createOrder(
    { ...request, requestId: request.requestId || newRequestId("order") },
    callOptions,
  );
}

/**
 * UpdateOrderStatus with a `requestId` (a fresh one when unset), so that the
 * service config's retry after a lost response is answered with the order
 * as it now stands, not FAILED_PRECONDITION.
 */
export function updateOrderStatus(
  client,
  id,
  status,
  { expectedVersion = 0n, requestId, ...callOptions } = {},
) {
  return client.updateOrderStatus(
    { id, status, expectedVersion, requestId: requestId || newRequestId("status") },
    callOptions,
  );
}
