"""The fault suite: real faults injected into a real PostgreSQL, and the
invariants every scenario must leave intact (see docs/reliability.md)."""
