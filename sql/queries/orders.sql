-- Queries on the orders table used by the seed script and the report.

-- name: truncate
TRUNCATE orders RESTART IDENTITY

-- name: copy_in_text
COPY orders (user_id, total, created_at) FROM STDIN

-- name: copy_in_binary
COPY orders (user_id, total, created_at) FROM STDIN (FORMAT BINARY)

-- name: count
SELECT count(*) FROM orders

-- name: per_user_summary
-- For the seed script's closing summary only; the report never aggregates in SQL.
SELECT user_id, count(*) AS orders, sum(total)::bigint AS total
FROM orders GROUP BY user_id ORDER BY user_id LIMIT %(limit)s

-- name: distinct_users
SELECT count(DISTINCT user_id) FROM orders
