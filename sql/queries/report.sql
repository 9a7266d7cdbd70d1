-- The payments report reads the orders with a plain projection and sums per user in
-- Python (jobrunner/aggregate.py). No aggregate, no GROUP BY, no window function here:
-- a test checks it, so nobody "optimises" the exercise away.

-- name: orders
SELECT user_id, total FROM orders

-- name: payments_rows
SELECT user_id, total FROM orders

-- name: payments_blocks
-- The table's size in blocks, to choose between one plain COPY of payments_rows (a
-- single statement reads one snapshot by itself) and parallel parts.
SELECT (pg_relation_size('orders') / current_setting('block_size')::bigint)::bigint AS nblocks

-- name: payments_lock
-- The aggregation (jobrunner/aggregate.py) reads payments_rows as text COPY, split
-- into block (ctid) ranges (payments_rows_range) read in parallel on several
-- connections that share one exported REPEATABLE READ snapshot.
-- Held to the end of the read: no TRUNCATE / VACUUM FULL rewrites the table meanwhile.
LOCK TABLE orders IN ACCESS SHARE MODE

-- name: payments_snapshot
-- Blocks are counted after the snapshot is taken, so every row it sees lies below.
SELECT pg_export_snapshot() AS snapshot,
       (pg_relation_size('orders') / current_setting('block_size')::bigint)::bigint AS nblocks

-- name: payments_part_lock
-- Every other part takes the same lock before importing the snapshot (LOCK takes no
-- snapshot, so the import may still follow), but waits only briefly: a TRUNCATE queued
-- behind the first connection's lock would otherwise wait for us while we wait for it,
-- a cycle through our process that PostgreSQL's deadlock check cannot see. On timeout
-- the whole read gives up (and is retried), releasing the first connection's lock.
SET LOCAL lock_timeout = '2s';
LOCK TABLE orders IN ACCESS SHARE MODE

-- name: payments_import_snapshot
-- {snapshot} is filled in with psycopg.sql.Literal (utility statements take no parameters).
SET TRANSACTION SNAPSHOT {snapshot}

-- name: payments_set_range
SELECT set_config('jobrunner.report_ctid_lo', $1, true),
       set_config('jobrunner.report_ctid_hi', $2, true)

-- name: payments_rows_range
-- The same plain projection, restricted to a ctid range (a TID Range Scan).
SELECT user_id, total FROM orders
WHERE ctid >= current_setting('jobrunner.report_ctid_lo')::tid
  AND ctid < current_setting('jobrunner.report_ctid_hi')::tid
