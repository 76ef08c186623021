// A tiny caller: creates an order, reads it back and tails its events.
//
//   node clients/node/example.js http://localhost:50051

import { createOrder, createOrderstreamClients, streamEvents } from "./index.js";
import { OrderStatus } from "./gen/orderstream/orders/v1/order_pb.js";

const { orders, events } = createOrderstreamClients(process.argv[2] ?? "http://localhost:50051");

// createOrder sets a request id, which makes a retry return the same order.
const order = await createOrder(orders, {
  customerId: "c-42",
  currency: "EUR",
  items: [{ sku: "BOOK-1", quantity: 2, unitPriceCents: 1250n }],
});
console.log(`created order ${order.id}, total ${order.totalCents} cents`);

const fetched = await orders.getOrder({ id: order.id });
console.log(`fetched order ${fetched.id}, status ${OrderStatus[fetched.status]}`);

for await (const event of streamEvents(events, { subject: `orders/${order.id}` })) {
  // The service always returns payloads as JSON text.
  console.log(`event ${event.id}: ${event.type} ${event.payload.value}`);
}
