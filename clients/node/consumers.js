// consumeEvents: a durable consumer (or a member of a consumer group)
// whose position the service keeps, acknowledged as the caller goes.

import { messagesOf, reopened } from "./reopen.js";

/**
 * Yields the consumer's events from after its acknowledged position,
 * following the feed until the caller stops iterating or `signal` aborts.
 *
 * An event counts as processed once the caller asks for the next one:
 * every `ackEvery` processed events, and at each progress message (a
 * heartbeat while the filter matches nothing, the live end, a group's new
 * partitions), the last processed position is acknowledged (AckEvents).
 * Events not yet acknowledged when the caller stops, or the process dies,
 * are sent again to the consumer's next stream: process them idempotently
 * (by event id). With `member`, this is one member of the consumer's group
 * (docs/streams.md#consumer-groups).
 *
 * A stream that fails with UNAVAILABLE is reopened, up to `reconnects`
 * times in a row without an event in between; it resumes after the
 * consumer's acknowledged position (a failed acknowledgement counts as the
 * stream's failure). Other errors are thrown as they are.
 *
 *   for await (const event of consumeEvents(events, "billing", { types: ["order.paid"] })) { ... }
 */
export async function* consumeEvents(
  client,
  consumer,
  { member = "", types = [], subject = "", ackEvery = 100, reconnects = 5, signal } = {},
) {
  let processed = 0n; // positions
  let acked = 0n;
  let unacked = 0; // events processed since the last acknowledgement

  async function acknowledge(callOptions) {
    if (processed > acked) {
      await client.ackEvents({ consumer, member, position: processed }, callOptions);
      [acked, unacked] = [processed, 0];
    }
  }

  // The service starts each stream after the consumer's acknowledged
  // position, so every stream asks for the same thing.
  async function* afterAcknowledged(callOptions) {
    const request = { consumer, member, types, subject, follow: true, progress: true };
    for await (const response of messagesOf(client.streamEvents(request, callOptions))) {
      for (const event of response.events) {
        yield event;
        processed = event.id > processed ? event.id : processed;
        if (++unacked >= ackEvery) await acknowledge(callOptions);
      }
      if (response.progress) {
        // Every event up to it that matched was yielded above.
        const { position } = response.progress;
        processed = position > processed ? position : processed;
        await acknowledge(callOptions);
      }
    }
  }

  yield* reopened(afterAcknowledged, { reconnects, signal });
}
