// uploadEvents: an UploadEvents client stream, batched under a byte budget
// and retried with the same uploadId.

import { create, toBinary } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";
import { EventSchema } from "./gen/orderstream/events/v1/event_pb.js";
import { UploadEventsRequestSchema } from "./gen/orderstream/events/v1/event_service_pb.js";
import { backoff, newRequestId, sleep } from "./retry.js";

// Serialized size one request aims to stay under: far below gRPC's default
// 4 MiB message limit, large enough to amortise per-message costs.
export const DEFAULT_BATCH_BYTES = 1 << 20;

// A repeated message field costs one tag byte and a length varint of at
// most five bytes on top of the element itself.
const FIELD_OVERHEAD = 6;

const sizeOf = (schema, message) => toBinary(schema, create(schema, message)).length;

/**
 * Packs events (an iterable or async iterable) into requests of at most
 * `maxBytes` serialized bytes (an event larger than that travels alone);
 * only the first request carries `uploadId`, and there always is a first one.
 */
export async function* uploadRequests(events, uploadId, maxBytes = DEFAULT_BATCH_BYTES) {
  let batch = [];
  let size = sizeOf(UploadEventsRequestSchema, { uploadId });
  let first = true;
  for await (const event of events) {
    const cost = sizeOf(EventSchema, event) + FIELD_OVERHEAD;
    if (batch.length > 0 && size + cost > maxBytes) {
      yield { uploadId: first ? uploadId : "", events: batch };
      [batch, size, first] = [[], 0, false];
    }
    batch.push(event);
    size += cost;
  }
  if (batch.length > 0 || first) yield { uploadId: first ? uploadId : "", events: batch };
}

/**
 * Uploads `events` all or nothing as one UploadEvents call. On UNAVAILABLE
 * the whole upload is sent again with the same `uploadId` (a fresh one when
 * unset), up to `attempts` times: the server commits an upload id at most
 * once and answers a repeat with the first result, so a retry after a lost
 * response cannot write twice. The requests already built stay in memory
 * until the upload is acknowledged. Other errors are thrown as they are.
 *
 *   const { eventCount, firstEventId } = await uploadEvents(events, generateEvents());
 */
export async function uploadEvents(
  client,
  events,
  { uploadId, maxBytes = DEFAULT_BATCH_BYTES, attempts = 5, timeoutMs } = {},
) {
  if (attempts < 1) throw new Error("uploadEvents: attempts must be at least 1");
  const source = uploadRequests(events, uploadId || newRequestId("upload"), maxBytes);
  // Every attempt reads the requests by index from `sent`, which one pull
  // at a time fills from `source`. Connect closes a failed attempt's input
  // (its return()), and a for await over `source` there would close
  // `source` too: the next attempt would commit the upload cut short.
  const sent = [];
  let exhausted = false;
  async function pullOne() {
    const { done, value } = await source.next();
    if (done) exhausted = true;
    else sent.push(value);
  }
  let pulling; // the pull under way, which every attempt that needs one waits for
  const pull = () => (pulling ??= pullOne().finally(() => (pulling = undefined)));
  async function* requests() {
    for (let next = 0; ; next++) {
      while (next === sent.length && !exhausted) await pull();
      if (next === sent.length) return;
      yield sent[next];
    }
  }
  for (let attempt = 1; ; attempt++) {
    try {
      return await client.uploadEvents(requests(), { timeoutMs });
    } catch (error) {
      if (ConnectError.from(error).code !== Code.Unavailable || attempt === attempts) throw error;
    }
    await sleep(backoff(attempt));
  }
}
