// streamEvents: StreamEvents one event at a time, resumed after a dropped
// connection from the last event handed out.

import { Code, ConnectError } from "@connectrpc/connect";
import { backoff, sleep } from "./retry.js";

/**
 * Yields the events after `afterId` in feed order, one by one.
 *
 * When the stream fails with UNAVAILABLE (connection lost, replica shutting
 * down), a new StreamEvents call resumes after the id of the last event
 * yielded: the feed is ordered by id, so that is neither a gap nor a
 * duplicate. Up to `reconnects` attempts in a row are made without
 * receiving anything; each event received resets the count. Other errors
 * are thrown as they are. With `follow`, the stream runs until the caller
 * stops iterating (which ends the call) or `signal` aborts.
 *
 *   for await (const event of streamEvents(events, { subject: "orders/42", follow: true })) { ... }
 */
export async function* streamEvents(
  client,
  { afterId = 0n, types = [], subject = "", follow = false, reconnects = 5, signal } = {},
) {
  let lastId = afterId;
  for (let failures = 0; ; ) {
    // Connect's clients end a stream only through its signal, not when its
    // reader stops: aborted on the way out, when the caller stops iterating.
    const call = new AbortController();
    try {
      const request = { afterId: lastId, types, subject, follow };
      const options = { signal: signal ? AbortSignal.any([signal, call.signal]) : call.signal };
      // Read by hand, not with for await: leaving a for await loop awaits
      // the stream's return(), which waits for its next message, and a
      // quiet follow stream may send none; the abort below ends it.
      const responses = client.streamEvents(request, options)[Symbol.asyncIterator]();
      for (let next = await responses.next(); !next.done; next = await responses.next()) {
        for (const event of next.value.events) {
          [lastId, failures] = [event.id, 0];
          yield event;
        }
      }
      return;
    } catch (error) {
      if (ConnectError.from(error).code !== Code.Unavailable || failures >= reconnects) throw error;
    } finally {
      call.abort();
    }
    failures++;
    await sleep(backoff(failures), signal);
  }
}
