// A bare gRPC server on a loopback port whose handlers the test writes
// (Connect's Node adapter over plain-text HTTP/2): the service config's
// retries and timeouts are decided by the codes a server answers, which the
// real service cannot be made to answer on demand.

import { createServer } from "node:http2";
import { once } from "node:events";
import { connectNodeAdapter } from "@connectrpc/connect-node";
import { EventService } from "../gen/orderstream/events/v1/event_service_pb.js";
import { OrderService } from "../gen/orderstream/orders/v1/order_service_pb.js";

/** Serves `orders` and `events` (partial implementations); resolves to its base URL and close(). */
export async function flakyServer({ orders = {}, events = {} }) {
  const handler = connectNodeAdapter({
    routes: (router) => router.service(OrderService, orders).service(EventService, events),
  });
  const server = createServer(handler);
  // close() waits for open sessions, and a client keeps its own open.
  const sessions = new Set();
  server.on("session", (session) => {
    sessions.add(session);
    session.on("close", () => sessions.delete(session));
  });
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  return {
    url: `http://127.0.0.1:${server.address().port}`,
    close: () => {
      const closed = new Promise((resolve) => server.close(resolve));
      for (const session of sessions) session.destroy();
      return closed;
    },
  };
}
