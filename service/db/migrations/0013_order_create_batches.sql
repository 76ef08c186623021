-- CreateOrder calls that arrive while another batch of them is being
-- written share one statement, hence one transaction and one commit
-- (service/orders/create_batches.py says when and why). On the benchmark
-- machine a transaction of four creates cost PostgreSQL 189 µs of CPU per
-- order against 304 µs for one create on its own (docs/benchmarks.md).
--
-- Each order is orders_create (0012) under its own subtransaction, so an
-- order the database refuses (a constraint, a value out of range) is
-- rolled back alone and reported on its own row by SQLSTATE, while the
-- batch's other orders are written. Any other error (the server read-only,
-- shutting down, the statement cancelled) fails the whole statement, and
-- every call of the batch reports it, as each would have on its own.
--
-- The orders come as parallel arrays, one element per order; their items
-- as three arrays of all the orders' items in order, with `item_counts`
-- saying how many belong to each order. A row per order, in order:
-- `n` its place (1-based), then orders_create's columns (all NULL when its
-- request_id was already taken: nothing was written), then `refused`
-- (its SQLSTATE when the database refused it, else NULL).

CREATE FUNCTION orders_create_batch(
    request_ids text[], request_hashes bytea[], customer_ids text[], currencies text[],
    totals bigint[], item_counts integer[], skus text[], quantities integer[], prices bigint[]
) RETURNS TABLE (
    n integer, id bigint, status text, version bigint,
    create_time timestamptz, update_time timestamptz, refused text
)
LANGUAGE plpgsql SET plan_cache_mode = auto AS $$
#variable_conflict use_column
DECLARE
    first_item integer := 1;
    last_item integer;
BEGIN
    FOR i IN 1 .. coalesce(cardinality(request_ids), 0) LOOP
        n := i;
        last_item := first_item + item_counts[i] - 1;
        id := NULL; status := NULL; version := NULL;
        create_time := NULL; update_time := NULL; refused := NULL;
        BEGIN
            SELECT c.id, c.status, c.version, c.create_time, c.update_time
            INTO id, status, version, create_time, update_time
            FROM orders_create(
                request_ids[i], request_hashes[i], customer_ids[i], currencies[i], totals[i],
                skus[first_item:last_item], quantities[first_item:last_item],
                prices[first_item:last_item]
            ) AS c;
        EXCEPTION WHEN integrity_constraint_violation OR data_exception THEN
            id := NULL; status := NULL; version := NULL;
            create_time := NULL; update_time := NULL;
            refused := SQLSTATE;
        END;
        first_item := last_item + 1;
        RETURN NEXT;
    END LOOP;
END
$$;
