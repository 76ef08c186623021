"""Orders and events with realistic spreads, generated inside PostgreSQL
(INSERT ... SELECT over generate_series: nothing crosses the wire), for the
scale benchmark (bench/scale.py) and the plan test (tests/test_plans.py).

Spreads, so that the planner sees what production would show it:

- customers: one per ten orders, skewed (the square of a uniform number
  picks the customer, so a few customers hold many orders and most a few);
- statuses by age: orders of the last two days still moving (PENDING 40%,
  PAID, SHIPPED, some CANCELLED), older ones 93% DELIVERED;
- creation times rising with the id at a steady 10,000 a day from
  2020-01-01 (`created_time`), with an hour's jitter (a larger table holds
  a longer history, not a busier day);
- one to three items per order;
- event types: two common ones (order.created, order.status_changed) and a
  long tail of twenty rarer ones down to about 0.1%;
- event subjects: `orders/<n>` over one subject per ten events, skewed like
  customers, and 5% without a subject.

Rows are appended after whatever the tables hold, so calling a fill again
grows them.
"""

from __future__ import annotations

import asyncpg

# Rows created a day, and so the seconds between two rows' creation times,
# from a fixed start: rows appended by a later fill come after the others.
PER_DAY = 10_000
_STEP_SECONDS = 86400 / PER_DAY
_START = 1577836800  # 2020-01-01T00:00:00Z, in Unix seconds


def created_time(row: int) -> float:
    """When the `row`th order or event was created (Unix seconds, before
    the orders' jitter)."""
    return _START + row * _STEP_SECONDS


# $1 first row number, $2 last row number, $3 total rows planned (for the
# time spread and the customer count).
_ORDERS = f"""
INSERT INTO orders (customer_id, currency, status, total_cents, create_time, update_time)
SELECT 'c-' || floor(power(random(), 2) * greatest($3 / 10, 1))::bigint,
       (ARRAY['EUR', 'USD', 'GBP'])[1 + (g % 3)],
       CASE
           WHEN age > 2 THEN
               CASE WHEN r < 0.93 THEN 'DELIVERED' WHEN r < 0.98 THEN 'CANCELLED' ELSE 'SHIPPED' END
           ELSE
               CASE WHEN r < 0.4 THEN 'PENDING' WHEN r < 0.7 THEN 'PAID'
                    WHEN r < 0.9 THEN 'SHIPPED' ELSE 'CANCELLED' END
       END,
       (random() * 100000)::bigint,
       t, t
FROM (
    SELECT g, ($3 - g)::float8 / {PER_DAY} AS age, random() AS r,
           to_timestamp({_START} + {_STEP_SECONDS} * g + random() * 3600) AS t
    FROM generate_series($1::bigint, $2::bigint) AS g
) AS o
ORDER BY g
"""

_ITEMS = """
INSERT INTO order_items (order_id, line_no, sku, quantity, unit_price_cents)
SELECT o.id, n, 'SKU-' || (o.id * 7 + n) % 5000, 1 + (o.id + n) % 4, 100 + (o.id * n) % 9900
FROM orders o CROSS JOIN LATERAL generate_series(1, 1 + (o.id % 3)::integer) AS n
WHERE o.id > $1
"""

# The type: below 0.5 order.created, below 0.8 order.status_changed, then
# the rarer types, each about half as likely as the one before (the last
# ones about 0.1% together).
_EVENTS = f"""
INSERT INTO events (type, source, subject, time, payload)
SELECT CASE
           WHEN r < 0.5 THEN 'order.created'
           WHEN r < 0.8 THEN 'order.status_changed'
           ELSE 'com.example.t' || least(19, floor(-ln((1 - r) / 0.2) / ln(2)))::integer
       END,
       'orderstream',
       CASE WHEN s < 0.05 THEN ''
            ELSE 'orders/' || floor(power(random(), 2) * greatest($3 / 10, 1))::bigint END,
       to_timestamp({_START} + {_STEP_SECONDS} * g),
       jsonb_build_object('n', g, 'amount', (random() * 10000)::integer)
FROM (SELECT g, random() AS r, random() AS s FROM generate_series($1::bigint, $2::bigint) AS g) e
ORDER BY g
"""

# Rows per statement: bounded so that one statement's sort and WAL stay modest.
_CHUNK = 1_000_000


async def fill(conn: asyncpg.Connection, *, orders: int, events: int, total: int) -> None:
    """Appends `orders` orders (with their items) and `events` events,
    spread as if `total` rows of each were planned, then ANALYZEs."""
    for table, count, sql in (("orders", orders, _ORDERS), ("events", events, _EVENTS)):
        start = await conn.fetchval(f"SELECT count(*) FROM {table}")
        for first in range(start + 1, start + count + 1, _CHUNK):
            last = min(first + _CHUNK - 1, start + count)
            if table == "orders":
                before = await conn.fetchval("SELECT coalesce(max(id), 0) FROM orders")
                await conn.execute(sql, first, last, total)
                await conn.execute(_ITEMS, before)
            else:
                await conn.execute(sql, first, last, total)
    await conn.execute("VACUUM ANALYZE orders, order_items, events")
