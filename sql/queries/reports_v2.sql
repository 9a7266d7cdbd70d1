-- Report API v2 (api/report_jobs.py): report jobs as the API shows them, and the
-- Idempotency-Key table (sql/003_report_api_v2.sql). Submitting inserts the job as the
-- queue's `enqueue` does (sql/queries/queue.sql: same row, same NOTIFY) and joins the
-- active one as its `active_by_dedupe_key` does, in one statement; cancelling uses the
-- queue's `cancel`.

-- name: job
-- One report job as the API shows it; the result (as JSON text, passed through
-- unparsed) only when the job succeeded.
SELECT j.id, j.state, j.attempts, j.max_attempts, j.created_at, j.started_at,
       j.finished_at, j.last_error, j.cancel_requested,
       CASE WHEN j.state = 'succeeded' THEN r.result::text END AS result_json
FROM jobs j LEFT JOIN results r ON r.job_id = j.id AND j.state = 'succeeded'
WHERE j.id = %(id)s AND j.kind = %(kind)s

-- name: jobs
-- The same for many jobs at once: one read answers every waiter of these jobs.
SELECT j.id, j.state, j.attempts, j.max_attempts, j.created_at, j.started_at,
       j.finished_at, j.last_error, j.cancel_requested,
       CASE WHEN j.state = 'succeeded' THEN r.result::text END AS result_json
FROM jobs j LEFT JOIN results r ON r.job_id = j.id AND j.state = 'succeeded'
WHERE j.id = ANY(%(ids)s::bigint[]) AND j.kind = %(kind)s

-- name: take_idempotency_key
-- Takes the key for this request. A concurrent request holding it makes this wait for
-- that transaction; if it committed, no row comes back and the key's job is read.
INSERT INTO idempotency_keys (scope, key)
VALUES (%(scope)s, %(key)s)
ON CONFLICT (scope, key) DO NOTHING
RETURNING key

-- name: idempotency_key_job
SELECT job_id FROM idempotency_keys WHERE scope = %(scope)s AND key = %(key)s

-- name: set_idempotency_key_job
UPDATE idempotency_keys SET job_id = %(job_id)s WHERE scope = %(scope)s AND key = %(key)s

-- name: submit
-- One round trip (autocommit): insert the report job, waking the queue's workers, or,
-- when an active job holds the dedupe key, return that one. No row when the holder is
-- not visible to this statement's snapshot (it committed while this statement waited on
-- its index entry) or finished in between: the caller runs the statement again.
WITH ins AS (
    INSERT INTO jobs (queue, kind, args, priority, run_at, max_attempts, dedupe_key)
    VALUES (%(queue)s, %(kind)s, %(args)s, 0, now(), %(max_attempts)s, %(dedupe_key)s)
    ON CONFLICT (dedupe_key)
        WHERE dedupe_key IS NOT NULL AND state IN ('queued', 'running', 'failed')
        DO NOTHING
    RETURNING id, state, queue
)
SELECT id, state, pg_notify('jobrunner_jobs', queue) AS notified FROM ins
UNION ALL
SELECT id, state, NULL FROM jobs
WHERE dedupe_key = %(dedupe_key)s AND state IN ('queued', 'running', 'failed')
  AND NOT EXISTS (SELECT FROM ins)

-- name: submit_with_idempotency_key
-- One statement, run in a transaction: the key's job if the key is taken; else the
-- report job (inserted, waking the workers, or the active one, as in `submit`) and the
-- key, taken for that job. Columns: id, state, holds (the key points at this job).
-- holds is false when a concurrent request with the same key took it first (this
-- statement then waited for that transaction): the caller rolls back, so a job inserted
-- here is undone, and runs the statement again, which then finds the key. No row when
-- the active job is not visible to this statement's snapshot: run it again, too.
WITH existing AS (
    SELECT job_id FROM idempotency_keys WHERE scope = %(scope)s AND key = %(key)s
), ins AS (
    INSERT INTO jobs (queue, kind, args, priority, run_at, max_attempts, dedupe_key)
    SELECT %(queue)s, %(kind)s, %(args)s, 0, now(), %(max_attempts)s, %(dedupe_key)s
    WHERE NOT EXISTS (SELECT FROM existing)
    ON CONFLICT (dedupe_key)
        WHERE dedupe_key IS NOT NULL AND state IN ('queued', 'running', 'failed')
        DO NOTHING
    RETURNING id, state
), job AS (
    SELECT id, state, true AS inserted FROM ins
    UNION ALL
    SELECT id, state, false FROM jobs
    WHERE dedupe_key = %(dedupe_key)s AND state IN ('queued', 'running', 'failed')
      AND NOT EXISTS (SELECT FROM existing) AND NOT EXISTS (SELECT FROM ins)
), taken AS (
    INSERT INTO idempotency_keys (scope, key, job_id)
    SELECT %(scope)s, %(key)s, id FROM job
    ON CONFLICT (scope, key) DO NOTHING
    RETURNING job_id
)
SELECT j.id, j.state, true AS holds, NULL AS notified
FROM existing e JOIN jobs j ON j.id = e.job_id
UNION ALL
SELECT job.id, job.state, EXISTS (SELECT FROM taken),
       CASE WHEN job.inserted THEN pg_notify('jobrunner_jobs', %(queue)s) END
FROM job
