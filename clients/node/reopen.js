// reopened: StreamEvents calls one after another, the next opened when one
// fails UNAVAILABLE; the loop that streamEvents and consumeEvents share,
// each with its own call.

import { Code, ConnectError } from "@connectrpc/connect";
import { backoff, sleep } from "./retry.js";

/**
 * Yields what `openStream(callOptions)` yields, one stream's worth at a
 * time. A stream that fails with UNAVAILABLE is replaced by a new
 * `openStream()` after a backoff, up to `reconnects` times in a row
 * without an item in between; it is up to `openStream` to start where the
 * last one stopped. Other errors are thrown as they are.
 *
 * `callOptions` carry the signal that ends the stream's calls: aborted
 * when the stream fails, when the caller stops iterating, or when `signal`
 * aborts.
 */
export async function* reopened(openStream, { reconnects, signal }) {
  for (let failures = 0; ; ) {
    // Connect's clients end a stream only through its signal, not when its
    // reader stops: aborted on the way out.
    const call = new AbortController();
    try {
      const callOptions = { signal: signal ? AbortSignal.any([signal, call.signal]) : call.signal };
      for await (const item of openStream(callOptions)) {
        failures = 0;
        yield item;
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

/**
 * The messages of a Connect stream, read by hand: leaving a for await loop
 * over the stream itself awaits its return(), which waits for its next
 * message, and a quiet follow stream may send none. Leaving a loop over
 * these returns at once; the abort of its call ends the stream.
 */
export async function* messagesOf(stream) {
  const messages = stream[Symbol.asyncIterator]();
  for (let next = await messages.next(); !next.done; next = await messages.next()) {
    yield next.value;
  }
}
