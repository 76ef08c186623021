"""A throwaway PostgreSQL cluster reachable only over verified TLS, for
`make run` and the tests (never part of the service's package or image)."""
