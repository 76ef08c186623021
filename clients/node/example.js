// A tiny caller: creates an order, reads it back and tails its events.
//
//   node clients/node/example.js http://localhost:50051

import { randomUUID } from "node:crypto";
import { createOrderstreamClients } from "./client.js";
import { OrderStatus } from "./gen/orderstream/orders/v1/order_pb.js";

const { orders, events } = createOrderstreamClients(process.argv[2] ?? "http://localhost:50051");

const order = await orders.createOrder({
  requestId: randomUUID(), // makes a retry of this call return the same order
  customerId: "c-42",
  currency: "EUR",
  items: [{ sku: "BOOK-1", quantity: 2, unitPriceCents: 1250n }],
});
console.log(`created order ${order.id}, total ${order.totalCents} cents`);

const fetched = await orders.getOrder({ id: order.id });
console.log(`fetched order ${fetched.id}, status ${OrderStatus[fetched.status]}`);

for await (const response of events.streamEvents({ subject: `orders/${order.id}` })) {
  for (const event of response.events) {
    // The service always returns payloads as JSON text.
    console.log(`event ${event.id}: ${event.type} ${event.payload.value}`);
  }
}
