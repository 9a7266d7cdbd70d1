-- Queries of the benchmarks (bench/). They run in a scratch database of their own.

-- name: server_settings
SELECT name, setting, unit
FROM pg_settings
WHERE name IN ('server_version', 'fsync', 'synchronous_commit', 'full_page_writes',
               'shared_buffers', 'work_mem', 'max_parallel_workers_per_gather',
               'max_connections', 'wal_level', 'max_wal_size')
ORDER BY name

-- name: scratch_databases
SELECT datname FROM pg_database WHERE datname LIKE 'bench\_%%' ORDER BY datname

-- name: reset_jobs
TRUNCATE jobs, results RESTART IDENTITY CASCADE

-- name: unfinished_count
SELECT count(*) FROM jobs WHERE state IN ('queued', 'running', 'failed')

-- name: burn_down_summary
-- The burn-down window as the database saw it: first claim to last finish.
SELECT count(*) FILTER (WHERE state = 'succeeded')                       AS succeeded,
       count(*) FILTER (WHERE state <> 'succeeded')                      AS other,
       count(*) FILTER (WHERE attempts > 1)                              AS retried,
       extract(epoch FROM max(finished_at) - min(started_at))::float8    AS seconds,
       (SELECT count(*) FROM results)                                    AS results
FROM jobs

-- name: started_at_epochs
-- Task start (the claim's transaction time) per job, as seconds since the epoch.
SELECT id, extract(epoch FROM started_at)::float8 FROM jobs
WHERE id = ANY(%(ids)s) AND started_at IS NOT NULL

-- name: finished_at_epochs
SELECT id, extract(epoch FROM finished_at)::float8, state FROM jobs
WHERE id = ANY(%(ids)s)

-- name: listening_backends
-- Listener connections of this database (the API names its own
-- `jobrunner-api-listener:<pid>`; any other backend whose last statement was a LISTEN
-- counts too), and all client backends of the database but ours.
SELECT count(*) FILTER (WHERE application_name LIKE 'jobrunner-api-listener%%'
                           OR query ILIKE 'LISTEN%%')  AS listening,
       count(*)                                       AS backends
FROM pg_stat_activity
WHERE datname = current_database() AND pid <> pg_backend_pid()
  AND backend_type = 'client backend'

-- name: naive_claim_and_start
-- The naive baseline (bench/naive.py): the oldest runnable job, one at a time.
UPDATE jobs j
SET state = 'running', attempts = j.attempts + 1, worker_id = %(worker_id)s,
    lease_expires_at = now() + interval '30 seconds', heartbeat_at = now(), started_at = now()
FROM (
    SELECT id FROM jobs
    WHERE state IN ('queued', 'failed') AND queue = %(queue)s AND run_at <= now()
    ORDER BY priority, run_at, id
    LIMIT 1
    FOR UPDATE SKIP LOCKED
) picked
WHERE j.id = picked.id
RETURNING j.id, j.kind, j.args

-- name: naive_finish
UPDATE jobs
SET state = 'succeeded', finished_at = clock_timestamp(), lease_expires_at = NULL
WHERE id = %(id)s

-- name: naive_save_result
INSERT INTO results (job_id, result, attempts, finished_at)
VALUES (%(id)s, %(result)s, 1, clock_timestamp())

-- name: naive_notify_done
SELECT pg_notify('jobrunner_done', json_build_object('id', %(id)s::bigint, 'state', 'succeeded')::text)

-- name: naive_enqueue
-- One job, then one NOTIFY of its own (a second statement, as a naive client writes it).
INSERT INTO jobs (queue, kind, args) VALUES (%(queue)s, %(kind)s, %(args)s) RETURNING id

-- name: naive_notify
SELECT pg_notify('jobrunner_jobs', %(queue)s)

-- name: trigger_design_create
-- The per-row NOTIFY trigger design that the queue avoids: a copy of the jobs table whose
-- every inserted row sends a notification from an AFTER INSERT FOR EACH ROW trigger.
CREATE TABLE bench_trigger_jobs (LIKE jobs INCLUDING ALL);
CREATE FUNCTION bench_trigger_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('bench_trigger_jobs',
                      json_build_object('id', NEW.id, 'queue', NEW.queue)::text);
    RETURN NEW;
END $$;
CREATE TRIGGER bench_trigger_jobs_notify AFTER INSERT ON bench_trigger_jobs
    FOR EACH ROW EXECUTE FUNCTION bench_trigger_notify()

-- name: trigger_design_drop
DROP TABLE IF EXISTS bench_trigger_jobs;
DROP FUNCTION IF EXISTS bench_trigger_notify()

-- name: trigger_design_insert
INSERT INTO bench_trigger_jobs (queue, kind, args, max_attempts)
VALUES (%(queue)s, %(kind)s, %(args)s, 5)
RETURNING id

-- name: plain_insert
-- The floor of transactional enqueue: the same row into jobs, no notification at all.
INSERT INTO jobs (queue, kind, args, max_attempts)
VALUES (%(queue)s, %(kind)s, %(args)s, 5)
RETURNING id

-- name: debounce_design_create
-- A proposal measured beside the queue's enqueue: NOTIFY at most once per 5 ms per queue
-- across all processes. A tiny unlogged table holds when each queue was last notified; a
-- writer that finds it older than 5 ms and not locked by another notifier (SKIP LOCKED,
-- so nobody waits) updates it and notifies; the others commit without a NOTIFY, so their
-- commits do not take the cluster-wide notification lock. (Workers would re-claim 5 ms
-- after a wake-up to pick up the jobs committed in the quiet window.)
CREATE UNLOGGED TABLE bench_notify_state (queue text PRIMARY KEY, notified_at timestamptz NOT NULL);
INSERT INTO bench_notify_state VALUES ('default', '-infinity')

-- name: debounce_design_drop
DROP TABLE IF EXISTS bench_notify_state

-- name: debounce_design_insert
WITH ins AS (
    INSERT INTO jobs (queue, kind, args, max_attempts)
    VALUES (%(queue)s, %(kind)s, %(args)s, 5)
    RETURNING id, queue
), due AS (
    SELECT s.queue FROM bench_notify_state s JOIN ins ON s.queue = ins.queue
    WHERE s.notified_at < clock_timestamp() - interval '5 milliseconds'
    FOR UPDATE OF s SKIP LOCKED
), upd AS (
    UPDATE bench_notify_state s SET notified_at = clock_timestamp()
    FROM due WHERE s.queue = due.queue
    RETURNING s.queue
)
SELECT ins.id,
       CASE WHEN upd.queue IS NOT NULL THEN pg_notify('jobrunner_jobs', upd.queue) END
FROM ins LEFT JOIN upd ON true
