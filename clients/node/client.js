// Creates orderstream clients over gRPC (HTTP/2) from the stubs in gen/,
// with TLS (optionally mutual), a bearer token and the default service
// config; index.js has the helpers over them.
//
// The stubs are JavaScript with .d.ts typings (protoc-gen-es target=js+dts),
// so Node runs them as they are and TypeScript callers get full types.

import { readFileSync } from "node:fs";
import { createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { EventService } from "./gen/orderstream/events/v1/event_service_pb.js";
import { OrderService } from "./gen/orderstream/orders/v1/order_service_pb.js";
import { lostConnectionsAsUnavailable } from "./lost-connections.js";
import { DEFAULT_SERVICE_CONFIG, withServiceConfig } from "./service-config.js";

/**
 * Opens one HTTP/2 connection to `baseUrl` and returns a client per service.
 *
 * `http://host:port` speaks plain text (prior knowledge, as `make run`
 * serves); `https://` verifies the server with `caFile` (the system roots
 * when unset), and `certFile` with `keyFile` add a client certificate for
 * mTLS. `token` is sent with every call as `authorization: Bearer <token>`,
 * over https only. `serviceConfig` replaces DEFAULT_SERVICE_CONFIG.
 *
 * @param {string} baseUrl e.g. "https://orderstream.internal:50051"
 * @param {{caFile?: string, certFile?: string, keyFile?: string, token?: string, serviceConfig?: object}} [options]
 */
export function createOrderstreamClients(baseUrl, options = {}) {
  const { caFile, certFile, keyFile, token, serviceConfig = DEFAULT_SERVICE_CONFIG } = options;
  const plainText = new URL(baseUrl).protocol === "http:";
  if (!certFile !== !keyFile) {
    throw new Error("createOrderstreamClients: certFile and keyFile go together");
  }
  if (plainText && (caFile || certFile)) {
    throw new Error("createOrderstreamClients: an http:// URL takes no certificates");
  }
  if (plainText && token) {
    throw new Error("createOrderstreamClients: a token is sent over https only");
  }
  const read = (path) => (path ? readFileSync(path) : undefined);
  const transport = createGrpcTransport({
    baseUrl,
    nodeOptions: { ca: read(caFile), cert: read(certFile), key: read(keyFile) },
    // Pings while calls are open, so a silently dropped connection (behind
    // Kubernetes, without a FIN) is noticed; every 5 minutes, as servers
    // not configured for more answer with "too_many_pings".
    pingIntervalMs: 300_000,
    pingTimeoutMs: 20_000,
    interceptors: [lostConnectionsAsUnavailable, ...(token ? [bearer(token)] : [])],
  });
  const configured = withServiceConfig(transport, serviceConfig);
  return {
    orders: createClient(OrderService, configured),
    events: createClient(EventService, configured),
  };
}

const bearer = (token) => (next) => (request) => {
  request.header.set("authorization", `Bearer ${token}`);
  return next(request);
};
