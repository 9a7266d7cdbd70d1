-- Queries of the failed-jobs tooling (jobrunner/admin.py, the `jobrunner failed|retry|
-- cancel|stats` commands and the admin HTTP API). The views and functions they use are
-- created by sql/004_failed_jobs.sql; the repairs are the SQL functions, so psql, the
-- CLI and the API share one implementation.

-- name: list_jobs
-- Keyset pagination by id: %(after)s is the last id of the previous page (0 for the
-- first); one row more than %(limit)s is fetched to tell whether a next page exists.
SELECT id, queue, kind, args, state, priority, attempts, max_attempts, run_at,
       created_at, started_at, finished_at, last_error, errors, worker_id
FROM jobs
WHERE id > %(after)s
  AND (%(state)s::text IS NULL OR state = %(state)s::text)
  AND (%(queue)s::text IS NULL OR queue = %(queue)s::text)
  AND (%(kind)s::text IS NULL OR kind = %(kind)s::text)
ORDER BY id
LIMIT %(limit)s + 1

-- name: failed_jobs
SELECT * FROM failed_jobs
WHERE (%(queue)s::text IS NULL OR queue = %(queue)s::text)
  AND (%(kind)s::text IS NULL OR kind = %(kind)s::text)
ORDER BY id
LIMIT %(limit)s

-- name: stats
SELECT queue, state, count, oldest_age_seconds FROM queue_stats

-- name: retry
SELECT * FROM jobrunner_retry(%(id)s)

-- name: retry_dead
SELECT job_id FROM jobrunner_retry_dead(queue => %(queue)s::text, kind => %(kind)s::text)

-- name: discard
SELECT * FROM jobrunner_discard(%(id)s)

-- name: get
SELECT * FROM jobs WHERE id = %(id)s

-- name: cancel
SELECT * FROM jobrunner_cancel(%(id)s)
