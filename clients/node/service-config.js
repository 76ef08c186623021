// The service config of Python's DEFAULT_SERVICE_CONFIG (the suite checks
// that they are equal; its comments there say why each method is or is not
// retried), and a Transport that carries it out: Connect's transports read
// no gRPC service config, so the timeouts, retry policies and retry
// throttling are applied here, as grpc-core and grpc-go apply them.

import { Code, ConnectError } from "@connectrpc/connect";
import { sleep } from "./retry.js";

const ORDERS = "orderstream.orders.v1.OrderService";
const EVENTS = "orderstream.events.v1.EventService";

const methods = (service, ...names) => names.map((method) => ({ service, method }));

const retry = (...codes) => ({
  maxAttempts: 4,
  initialBackoff: "0.1s",
  maxBackoff: "2s",
  backoffMultiplier: 2,
  retryableStatusCodes: codes,
});

// loadBalancingConfig is there for parity: one Connect transport speaks to
// one address, so spreading calls over pods is left to the proxy in front.
export const DEFAULT_SERVICE_CONFIG = {
  loadBalancingConfig: [{ round_robin: {} }],
  methodConfig: [
    {
      name: [
        ...methods(ORDERS, "GetOrder", "ListOrders", "CreateOrder"),
        ...methods(EVENTS, "GetEvent", "AckEvents", "ListConsumers", "GetConsumer", "ResetConsumer"),
      ],
      timeout: "10s",
      retryPolicy: retry("UNAVAILABLE", "ABORTED"),
    },
    {
      name: methods(ORDERS, "UpdateOrderStatus"),
      timeout: "10s",
      retryPolicy: retry("UNAVAILABLE"),
    },
    {
      name: methods(EVENTS, "PublishEvents"),
      timeout: "10s",
    },
    {
      name: [
        ...methods(ORDERS, "ExportOrders", "ImportOrders"),
        ...methods(EVENTS, "UploadEvents", "StreamEvents"),
      ],
      retryPolicy: retry("UNAVAILABLE"),
    },
  ],
  retryThrottling: { maxTokens: 10, tokenRatio: 0.1 },
};

const seconds = (duration) => Number.parseFloat(duration) * 1000;

// "DEADLINE_EXCEEDED" -> Code.DeadlineExceeded (Connect's codes are gRPC's).
const code = (name) =>
  Code[name.toLowerCase().replace(/(?:^|_)(\w)/g, (_, letter) => letter.toUpperCase())];

function policies(config) {
  const found = new Map();
  for (const entry of config.methodConfig ?? []) {
    const policy = {
      timeoutMs: entry.timeout ? seconds(entry.timeout) : undefined,
      retry: entry.retryPolicy && {
        maxAttempts: entry.retryPolicy.maxAttempts,
        initialMs: seconds(entry.retryPolicy.initialBackoff),
        maxMs: seconds(entry.retryPolicy.maxBackoff),
        multiplier: entry.retryPolicy.backoffMultiplier,
        codes: new Set(entry.retryPolicy.retryableStatusCodes.map(code)),
      },
    };
    for (const { service, method } of entry.name) {
      found.set(`${service}/${method}`, policy);
    }
  }
  return found;
}

// gRPC's retry throttling: each retryable failure costs a token, each
// success earns tokenRatio back, and retries stop while half are gone.
function throttle({ maxTokens, tokenRatio } = { maxTokens: Infinity, tokenRatio: 0 }) {
  let tokens = maxTokens;
  return {
    failed: () => (tokens = Math.max(0, tokens - 1)),
    succeeded: () => (tokens = Math.min(maxTokens, tokens + tokenRatio)),
    allows: () => tokens > maxTokens / 2,
  };
}

async function attempts(policy, throttled, signal, call) {
  for (let attempt = 1; ; attempt++) {
    try {
      const response = await call();
      throttled.succeeded();
      return response;
    } catch (error) {
      const retryable = policy.retry?.codes.has(ConnectError.from(error).code);
      if (retryable) throttled.failed();
      if (!retryable || attempt >= policy.retry.maxAttempts || !throttled.allows()) throw error;
      // gRPC's backoff: a random wait up to the current bound, which grows.
      const bound = Math.min(
        policy.retry.maxMs,
        policy.retry.initialMs * policy.retry.multiplier ** (attempt - 1),
      );
      await sleep(Math.random() * bound, signal);
    }
  }
}

// Waits for a server stream's first message, so that a failure before it
// (the only time gRPC replays a stream) can be retried; hands the stream on
// with that message put back in front.
async function started(response) {
  const messages = response.message[Symbol.asyncIterator]();
  const first = await messages.next();
  async function* replay() {
    if (first.done) return;
    yield first.value;
    for (let next = await messages.next(); !next.done; next = await messages.next()) {
      yield next.value;
    }
  }
  return { ...response, message: replay() };
}

async function collect(messages) {
  const all = [];
  for await (const message of messages) all.push(message);
  return all;
}

async function* fromArray(messages) {
  yield* messages;
}

/**
 * `transport` with `config`'s per-method timeouts (where the call sets
 * none) and retry policies. Unary calls and server streams (before their
 * first message) are retried; client streams are not, since their input
 * cannot be read twice: `uploadEvents` re-sends on its own.
 */
export function withServiceConfig(transport, config = DEFAULT_SERVICE_CONFIG) {
  const byMethod = policies(config);
  const throttled = throttle(config.retryThrottling);
  const policyOf = (method) => byMethod.get(`${method.parent.typeName}/${method.name}`) ?? {};
  return {
    unary(method, signal, timeoutMs, header, input, contextValues) {
      const policy = policyOf(method);
      return attempts(policy, throttled, signal, () =>
        transport.unary(method, signal, timeoutMs ?? policy.timeoutMs, header, input, contextValues),
      );
    },
    stream(method, signal, timeoutMs, header, input, contextValues) {
      const policy = policyOf(method);
      const call = (messages) =>
        transport.stream(method, signal, timeoutMs ?? policy.timeoutMs, header, messages, contextValues);
      if (method.methodKind !== "server_streaming") return call(input);
      // A server stream's input is one message: kept, to be sent again.
      const kept = collect(input);
      return attempts(policy, throttled, signal, async () =>
        started(await call(fromArray(await kept))),
      );
    },
  };
}
