"""The gRPC boundary: where calls come in, are decoded, authenticated,
observed and turned into statuses. Knows nothing of orders or events."""
