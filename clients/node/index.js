// The Node client: clients over the generated stubs (client.js) and the
// helpers of Python's orderstream.client, with the same names in
// camelCase (docs/clients.md has the table).

export { createOrderstreamClients } from "./client.js";
export { DEFAULT_SERVICE_CONFIG, withServiceConfig } from "./service-config.js";
export { consumeEvents } from "./consumers.js";
export { lostConnectionsAsUnavailable } from "./lost-connections.js";
export { streamEvents } from "./streams.js";
export { DEFAULT_BATCH_BYTES, uploadEvents, uploadRequests } from "./uploads.js";
export { createOrder, publishEvents, updateOrderStatus } from "./writes.js";
