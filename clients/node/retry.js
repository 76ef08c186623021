// What the helpers share: backoff, waiting, fresh idempotency keys.

import { randomUUID } from "node:crypto";
import { setTimeout as delay } from "node:timers/promises";

/** Milliseconds before retry number `attempt` (1-based): 100 doubling up to 2000. */
export const backoff = (attempt) => Math.min(2000, 100 * 2 ** (attempt - 1));

/** Waits `ms`, or rejects when `signal` aborts first. */
export const sleep = (ms, signal) => delay(ms, undefined, { signal });

/** A fresh idempotency key, e.g. `publish-3f2a...`. */
export const newRequestId = (kind) => `${kind}-${randomUUID().replaceAll("-", "")}`;
