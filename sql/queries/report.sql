-- The payments report reads the orders with a plain projection and sums per user in
-- Python (jobrunner/aggregate.py). No aggregate, no GROUP BY, no window function here:
-- a test checks it, so nobody "optimises" the exercise away.

-- name: orders
SELECT user_id, total FROM orders

-- name: copy_orders_binary
COPY (SELECT user_id, total FROM orders) TO STDOUT (FORMAT BINARY)
