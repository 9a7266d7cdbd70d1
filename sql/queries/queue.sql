-- Queries of the job queue (jobrunner/queue.py and jobrunner/worker.py).
-- Channels: jobrunner_jobs (payload: queue name) wakes workers;
--           jobrunner_done (payload: {"id": ..., "state": ...}) reports final states;
--           jobrunner_cancel (payload: job id) asks a running job to stop.

-- name: enqueue
-- One round trip: insert, and wake the queue's workers if the job may run now.
-- A duplicate active dedupe_key inserts nothing and returns no row.
WITH ins AS (
    INSERT INTO jobs (queue, kind, args, priority, run_at, max_attempts, dedupe_key)
    VALUES (%(queue)s, %(kind)s, %(args)s, %(priority)s,
            COALESCE(%(run_at)s, now() + make_interval(secs => %(delay)s)),
            %(max_attempts)s, %(dedupe_key)s)
    ON CONFLICT (dedupe_key)
        WHERE dedupe_key IS NOT NULL AND state IN ('queued', 'running', 'failed')
        DO NOTHING
    RETURNING *
)
SELECT ins.*,
       CASE WHEN ins.run_at <= now() THEN pg_notify('jobrunner_jobs', ins.queue) END AS notified
FROM ins

-- name: active_by_dedupe_key
SELECT * FROM jobs
WHERE dedupe_key = %(dedupe_key)s AND state IN ('queued', 'running', 'failed')

-- name: enqueue_many
-- Bulk insert from one JSON array of args (100,000 jobs in one statement).
INSERT INTO jobs (queue, kind, args, priority, run_at, max_attempts)
SELECT %(queue)s, %(kind)s, a.value, %(priority)s,
       COALESCE(%(run_at)s, now() + make_interval(secs => %(delay)s)), %(max_attempts)s
FROM jsonb_array_elements(%(args)s::jsonb) WITH ORDINALITY AS a(value, n)
ORDER BY a.n
RETURNING id

-- name: notify_queue
SELECT pg_notify('jobrunner_jobs', %(queue)s)

-- name: get
SELECT j.*, r.result
FROM jobs j LEFT JOIN results r ON r.job_id = j.id
WHERE j.id = %(id)s

-- name: cancel
-- Queued or waiting-for-retry jobs are cancelled at once; running ones are asked to stop
-- (the task checks; the worker hears jobrunner_cancel). Finished jobs are left alone.
-- One implementation for Python and psql: the function jobrunner_cancel of
-- sql/004_failed_jobs.sql (locks the row; raises no_data_found for an unknown id).
SELECT id, state FROM jobrunner_cancel(%(id)s)

-- name: claim
-- One statement claims up to %(limit)s jobs of one queue for one worker: first jobs whose
-- worker died (lease expired; the lost attempt is recorded as an error), then runnable jobs
-- by priority, run_at, id. SKIP LOCKED lets concurrent workers pass each other; the CTEs
-- are read lazily, so the second one locks nothing once the first filled the batch.
WITH expired AS (
    SELECT id FROM jobs
    WHERE state = 'running' AND queue = %(queue)s AND lease_expires_at < now()
      AND attempts < max_attempts AND NOT cancel_requested
    ORDER BY lease_expires_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), ready AS (
    SELECT id FROM jobs
    WHERE state IN ('queued', 'failed') AND queue = %(queue)s AND run_at <= now()
    ORDER BY priority, run_at, id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), picked AS (
    SELECT id FROM expired
    UNION ALL
    SELECT id FROM ready
    LIMIT %(limit)s
)
UPDATE jobs j
SET state = 'running',
    attempts = j.attempts + 1,
    worker_id = %(worker_id)s,
    lease_expires_at = now() + make_interval(secs => %(lease)s),
    heartbeat_at = now(),
    started_at = now(),
    last_error = CASE WHEN j.state = 'running'
                      THEN 'lease expired: worker ' || j.worker_id || ' stopped heartbeating'
                      ELSE j.last_error END,
    errors = CASE WHEN j.state = 'running'
                  THEN j.errors || jsonb_build_array(jsonb_build_object(
                      'attempt', j.attempts, 'error_type', 'LeaseExpired',
                      'message', 'lease expired: worker ' || j.worker_id || ' stopped heartbeating',
                      'traceback', NULL, 'worker', j.worker_id, 'at', now(), 'retry_at', now()))
                  ELSE j.errors END
FROM picked
WHERE j.id = picked.id
RETURNING j.id, j.queue, j.kind, j.args, j.attempts, j.max_attempts, j.cancel_requested,
          GREATEST(0, extract(epoch FROM now() - j.run_at))::float8 AS waited  -- pickup latency

-- name: reap_expired
-- Jobs whose worker died during their last allowed attempt (or after a cancel request)
-- are not run again: dead (or cancelled), with the lost attempt recorded.
WITH lost AS (
    SELECT id FROM jobs
    WHERE state = 'running' AND lease_expires_at < now()
      AND (attempts >= max_attempts OR cancel_requested)
    ORDER BY lease_expires_at
    LIMIT 1000
    FOR UPDATE SKIP LOCKED
), upd AS (
    UPDATE jobs j
    SET state = CASE WHEN j.cancel_requested THEN 'cancelled' ELSE 'dead' END,
        finished_at = now(),
        lease_expires_at = NULL,
        last_error = 'lease expired: worker ' || j.worker_id || ' stopped heartbeating',
        errors = j.errors || jsonb_build_array(jsonb_build_object(
            'attempt', j.attempts, 'error_type', 'LeaseExpired',
            'message', 'lease expired: worker ' || j.worker_id || ' stopped heartbeating',
            'traceback', NULL, 'worker', j.worker_id, 'at', now(), 'retry_at', NULL))
    FROM lost
    WHERE j.id = lost.id
    RETURNING j.id, j.state
)
SELECT id, state, pg_notify('jobrunner_done', json_build_object('id', id, 'state', state)::text)
FROM upd

-- name: complete
-- Batch completion: parallel arrays of ids, attempts and results (JSON text or NULL),
-- sent as binary arrays (cheaper to ship and parse than a JSON document). Only rows this worker
-- still holds in that very attempt change (the lease token), so a late finisher never
-- overwrites a re-claimed job nor writes a second result. The result row is written in
-- the same statement (and transaction) as the succeeded state.
WITH f AS (
    SELECT * FROM unnest(%(ids)s::bigint[], %(attempts)s::integer[], %(results)s::text[])
        AS f(id, attempts, result)
), done AS (
    UPDATE jobs j
    SET state = 'succeeded', finished_at = now(), lease_expires_at = NULL
    FROM f
    WHERE j.id = f.id AND j.attempts = f.attempts AND j.worker_id = %(worker_id)s
      AND j.state = 'running'
    RETURNING j.id, j.attempts, f.result::jsonb AS result
), saved AS (
    INSERT INTO results (job_id, result, attempts, finished_at)
    SELECT id, result, attempts, now() FROM done
    ON CONFLICT (job_id) DO UPDATE
        SET result = EXCLUDED.result, attempts = EXCLUDED.attempts, finished_at = EXCLUDED.finished_at
    RETURNING job_id
)
SELECT job_id, pg_notify('jobrunner_done', json_build_object('id', job_id, 'state', 'succeeded')::text)
FROM saved

-- name: fail
-- Batch of failed attempts. %(items)s: [{"id", "attempts", "permanent", "retry_in",
-- "error_type", "message", "traceback"}, ...]. Retried (failed, run_at = now + retry_in)
-- until max_attempts, then dead; permanent failures are dead at once; a job whose cancel
-- was requested ends cancelled. Guarded by the lease token like `complete`.
WITH f AS (
    SELECT * FROM jsonb_to_recordset(%(items)s::jsonb) AS f(
        id bigint, attempts integer, permanent boolean, retry_in double precision,
        error_type text, message text, traceback text)
), target AS (
    SELECT f.*,
           CASE WHEN j.cancel_requested THEN 'cancelled'
                WHEN f.permanent OR j.attempts >= j.max_attempts THEN 'dead'
                ELSE 'failed' END AS new_state
    FROM jobs j JOIN f ON j.id = f.id
    WHERE j.attempts = f.attempts AND j.worker_id = %(worker_id)s AND j.state = 'running'
    FOR UPDATE OF j
), upd AS (
    UPDATE jobs j
    SET state = t.new_state,
        run_at = CASE WHEN t.new_state = 'failed' THEN now() + make_interval(secs => t.retry_in)
                      ELSE j.run_at END,
        finished_at = CASE WHEN t.new_state = 'failed' THEN NULL ELSE now() END,
        lease_expires_at = NULL,
        last_error = t.message,
        errors = j.errors || jsonb_build_array(jsonb_build_object(
            'attempt', j.attempts, 'error_type', t.error_type, 'message', t.message,
            'traceback', t.traceback, 'worker', j.worker_id, 'at', now(),
            'retry_at', CASE WHEN t.new_state = 'failed'
                             THEN now() + make_interval(secs => t.retry_in) END))
    FROM target t
    WHERE j.id = t.id
    RETURNING j.id, j.state
)
SELECT id, state,
       CASE WHEN state <> 'failed'
            THEN pg_notify('jobrunner_done', json_build_object('id', id, 'state', state)::text) END
FROM upd

-- name: cancelled
-- Batch of jobs whose task stopped because a cancel was requested (or which were
-- cancelled before they started). %(items)s: [{"id", "attempts"}, ...].
WITH f AS (
    SELECT * FROM jsonb_to_recordset(%(items)s::jsonb) AS f(id bigint, attempts integer)
), upd AS (
    UPDATE jobs j
    SET state = 'cancelled', finished_at = now(), lease_expires_at = NULL
    FROM f
    WHERE j.id = f.id AND j.attempts = f.attempts AND j.worker_id = %(worker_id)s
      AND j.state = 'running'
    RETURNING j.id, j.state
)
SELECT id, state, pg_notify('jobrunner_done', json_build_object('id', id, 'state', state)::text)
FROM upd

-- name: release
-- Shutdown: jobs this worker holds but did not finish go back to queued, the attempt not
-- counted against them (or to cancelled if a cancel was requested meanwhile).
WITH f AS (
    SELECT * FROM jsonb_to_recordset(%(items)s::jsonb) AS f(id bigint, attempts integer)
), upd AS (
    UPDATE jobs j
    SET state = CASE WHEN j.cancel_requested THEN 'cancelled' ELSE 'queued' END,
        attempts = CASE WHEN j.cancel_requested THEN j.attempts ELSE j.attempts - 1 END,
        finished_at = CASE WHEN j.cancel_requested THEN now() END,
        worker_id = CASE WHEN j.cancel_requested THEN j.worker_id END,
        lease_expires_at = NULL,
        heartbeat_at = NULL
    FROM f
    WHERE j.id = f.id AND j.attempts = f.attempts AND j.worker_id = %(worker_id)s
      AND j.state = 'running'
    RETURNING j.id, j.state, j.queue
)
SELECT id, state,
       CASE WHEN state = 'cancelled'
            THEN pg_notify('jobrunner_done', json_build_object('id', id, 'state', state)::text)
            ELSE pg_notify('jobrunner_jobs', queue) END
FROM upd

-- name: heartbeat
-- Extend the leases of the jobs this worker holds; answers which are still held and
-- whether a cancel was requested for them.
UPDATE jobs j
SET lease_expires_at = now() + make_interval(secs => %(lease)s), heartbeat_at = now()
FROM unnest(%(ids)s::bigint[], %(attempts)s::integer[]) AS h(id, attempts)
WHERE j.id = h.id AND j.attempts = h.attempts AND j.worker_id = %(worker_id)s
  AND j.state = 'running'
RETURNING j.id, j.cancel_requested

-- name: prune
-- One batch of finished jobs older than the cutoff (their results go with them).
WITH old AS (
    SELECT id FROM jobs
    WHERE state IN ('succeeded', 'dead', 'cancelled')
      AND finished_at < now() - make_interval(secs => %(older_than)s)
    ORDER BY finished_at
    LIMIT %(batch)s
    FOR UPDATE SKIP LOCKED
)
DELETE FROM jobs j USING old WHERE j.id = old.id
