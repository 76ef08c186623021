"""The process and its telemetry: metrics, tracing, logs, worker processes."""
