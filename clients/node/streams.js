// streamEvents: StreamEvents one event at a time, resumed after a dropped
// connection from the last event handed out.

import { messagesOf, reopened } from "./reopen.js";

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
  async function* afterLastId(callOptions) {
    const request = { afterId: lastId, types, subject, follow };
    for await (const response of messagesOf(client.streamEvents(request, callOptions))) {
      yield* response.events;
    }
  }
  for await (const event of reopened(afterLastId, { reconnects, signal })) {
    lastId = event.id;
    yield event;
  }
}
