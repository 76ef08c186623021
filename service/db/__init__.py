"""PostgreSQL through asyncpg: the pool, the per-call runner, read routing to
a replica, and the migrations. Knows nothing of gRPC."""
