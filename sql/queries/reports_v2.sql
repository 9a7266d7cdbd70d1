-- Report API v2 (api/report_jobs.py): report jobs as the API shows them, and the
-- Idempotency-Key table (sql/003_report_api_v2.sql). Submitting reuses the queue's own
-- `enqueue` and `active_by_dedupe_key` (sql/queries/queue.sql); cancelling its `cancel`.

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
