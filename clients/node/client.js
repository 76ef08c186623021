// Creates orderstream clients over gRPC (HTTP/2) from the stubs in gen/.
//
// The stubs are JavaScript with .d.ts typings (protoc-gen-es target=js+dts),
// so Node runs them as they are and TypeScript callers get full types.

import { readFileSync } from "node:fs";
import { createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { EventService } from "./gen/orderstream/events/v1/event_service_pb.js";
import { OrderService } from "./gen/orderstream/orders/v1/order_service_pb.js";

/**
 * Opens one HTTP/2 connection to `baseUrl` and returns a client per service.
 *
 * `http://host:port` speaks plain text (prior knowledge, as `make run`
 * serves); `https://` verifies the server with `caFile`, and `certFile` with
 * `keyFile` add a client certificate for mTLS.
 *
 * @param {string} baseUrl e.g. "http://localhost:50051"
 * @param {{caFile?: string, certFile?: string, keyFile?: string}} [tls]
 */
export function createOrderstreamClients(baseUrl, tls = {}) {
  const read = (path) => (path ? readFileSync(path) : undefined);
  const transport = createGrpcTransport({
    baseUrl,
    nodeOptions: { ca: read(tls.caFile), cert: read(tls.certFile), key: read(tls.keyFile) },
    // Pings an idle connection so a silently dropped one is noticed.
    pingIntervalMs: 300_000,
  });
  return {
    orders: createClient(OrderService, transport),
    events: createClient(EventService, transport),
  };
}
