-- Listings filtered by creation time start where the window's orders start
-- (service/orders/sql.py, window_start): the smallest id of a window is read
-- from this index alone, without visiting the table. It replaces the index
-- on create_time alone, which it serves as well.

CREATE INDEX orders_create_time_id_idx ON orders (create_time, id);
DROP INDEX orders_create_time_idx;
