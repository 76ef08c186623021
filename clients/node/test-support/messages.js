// The orders and events the suites against the real service write.

/** A one-item order for `customerId` (no request id: the helpers add one). */
export const newOrder = (customerId) => ({
  customerId,
  currency: "EUR",
  items: [{ sku: "SKU-1", quantity: 1, unitPriceCents: 100n }],
});

/** `count` events on `subject`, numbered in their payload from `from`. */
export const newEvents = (subject, from, count, padding = "") =>
  Array.from({ length: count }, (_, n) => ({
    type: "test.node",
    source: subject,
    subject,
    payload: { case: "jsonPayload", value: JSON.stringify({ n: from + n, padding }) },
  }));
