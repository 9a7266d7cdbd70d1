-- Failed jobs: what operators look at and repair, from psql, the CLI and the admin API.
--
-- Views:      failed_jobs   jobs that failed at least once and have not succeeded
--             dead_jobs     jobs whose attempts ran out (or that failed permanently)
--             queue_stats   per queue and state: how many jobs, the oldest one's age
-- Functions:  jobrunner_retry(job_id, extra_attempts => 1)     dead/failed -> queued now
--             jobrunner_retry_dead(queue => NULL, kind => NULL) every dead job (of a queue/kind)
--             jobrunner_cancel(job_id)                          queued/failed -> cancelled;
--                                                               running -> cancel requested
--             jobrunner_discard(job_id)                         delete a finished job
--
-- Concurrency: each function locks the job's row (SELECT ... FOR UPDATE) before it looks
-- at the state, so it serialises with the workers' claim, completion and failure
-- statements (which lock the same rows) and only changes jobs in the states that allow
-- it. A running job is never taken from its worker: retry and discard refuse it, cancel
-- only asks it to stop (its worker hears NOTIFY jobrunner_cancel).
--
-- Errors raised (SQLSTATE, for programs): P0002 no_data_found for an unknown id;
-- 55000 object_not_in_prerequisite_state when the job's state does not allow the change;
-- 23505 unique_violation when a retried job's dedupe_key is held by another active job.
--
-- Wake-ups: a job put back to queued sends NOTIFY jobrunner_jobs (payload: its queue),
-- as enqueue does; a job that becomes cancelled sends NOTIFY jobrunner_done
-- ({"id": ..., "state": "cancelled"}), as the workers do for every final state.

-- The views read only the rows they show: two small partial indexes (failed and dead jobs
-- are few next to the succeeded ones), with the views' own predicates. A job enters them
-- only when it fails, so the hot path (enqueue, claim, success) never touches them.
CREATE INDEX jobs_failed_idx ON jobs (id)
    WHERE state <> 'succeeded' AND (state IN ('failed', 'dead') OR jsonb_array_length(errors) > 0);
CREATE INDEX jobs_dead_idx ON jobs (queue, kind) WHERE state = 'dead';

CREATE VIEW failed_jobs AS
SELECT id, queue, kind, state, attempts, max_attempts,
       jsonb_array_length(errors) AS errors_count,
       last_error,
       (errors -> -1 ->> 'at')::timestamptz AS last_failed_at,
       CASE WHEN state IN ('queued', 'failed') THEN run_at END AS next_run_at,
       created_at, finished_at
FROM jobs
WHERE state <> 'succeeded'
  AND (state IN ('failed', 'dead') OR jsonb_array_length(errors) > 0)
ORDER BY id;

COMMENT ON VIEW failed_jobs IS
    'Jobs that failed at least once and have not succeeded (retrying, dead, or cancelled after a failure).';

CREATE VIEW dead_jobs AS
SELECT id, queue, kind, args, attempts, max_attempts,
       jsonb_array_length(errors) AS errors_count,
       last_error, created_at, finished_at AS died_at, errors
FROM jobs
WHERE state = 'dead'
ORDER BY id;

COMMENT ON VIEW dead_jobs IS
    'Jobs whose attempts ran out or that failed permanently; errors holds one entry per failed attempt.';

-- The age is measured from created_at: how long the oldest job of that queue and state
-- has existed. One pass over the table (keep it pruned: jobrunner prune).
CREATE VIEW queue_stats AS
SELECT queue, state, count(*) AS count,
       date_trunc('second', now() - min(created_at)) AS oldest_age,
       round(extract(epoch FROM now() - min(created_at)), 3) AS oldest_age_seconds
FROM jobs
GROUP BY queue, state
ORDER BY queue, array_position(ARRAY['queued', 'running', 'failed', 'succeeded', 'dead', 'cancelled'], state);

COMMENT ON VIEW queue_stats IS 'Per queue and state: number of jobs and the age of the oldest one.';


-- Retry one job: dead or failed -> queued, runnable now. Attempts and the error history
-- are kept. A job that used up its attempts gets `extra_attempts` more (default one):
-- max_attempts becomes max(max_attempts, attempts + extra_attempts), so a retried dead
-- job dies again after that many further failures instead of at its first one.
CREATE FUNCTION jobrunner_retry(job_id bigint, extra_attempts integer DEFAULT 1)
RETURNS SETOF jobs
LANGUAGE plpgsql
AS $$
DECLARE
    j jobs;
BEGIN
    IF extra_attempts IS NULL OR extra_attempts < 1 THEN
        RAISE EXCEPTION 'extra_attempts must be at least 1' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT * INTO j FROM jobs WHERE id = job_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no job with id %', job_id USING ERRCODE = 'no_data_found';
    END IF;
    IF j.state NOT IN ('dead', 'failed') THEN
        RAISE EXCEPTION 'job % is %: only failed or dead jobs can be retried', job_id, j.state
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    IF j.dedupe_key IS NOT NULL AND j.state = 'dead' AND EXISTS (
        SELECT 1 FROM jobs o
        WHERE o.dedupe_key = j.dedupe_key AND o.id <> j.id
          AND o.state IN ('queued', 'running', 'failed')) THEN
        RAISE EXCEPTION 'job %: dedupe_key % is held by another active job', job_id, j.dedupe_key
            USING ERRCODE = 'unique_violation';
    END IF;
    UPDATE jobs
    SET state = 'queued',
        run_at = now(),
        max_attempts = GREATEST(max_attempts, attempts + extra_attempts),
        finished_at = NULL,
        lease_expires_at = NULL,
        heartbeat_at = NULL,
        worker_id = NULL,
        cancel_requested = false
    WHERE id = job_id
    RETURNING * INTO j;
    PERFORM pg_notify('jobrunner_jobs', j.queue);
    RETURN NEXT j;
END
$$;

COMMENT ON FUNCTION jobrunner_retry(bigint, integer) IS
    'Dead or failed job -> queued now; attempts and errors kept; a job out of attempts gets extra_attempts more.';


-- Retry every dead job, optionally only those of one queue and/or kind. Returns the ids
-- (SELECT count(*) FROM jobrunner_retry_dead(...) for a count). Dead jobs another session
-- holds locked right now are skipped (SKIP LOCKED), as are jobs whose dedupe_key another
-- active job holds.
CREATE FUNCTION jobrunner_retry_dead(queue text DEFAULT NULL, kind text DEFAULT NULL,
                                     extra_attempts integer DEFAULT 1)
RETURNS TABLE (job_id bigint)
LANGUAGE plpgsql
AS $$
#variable_conflict use_column
DECLARE
    d record;
    ids bigint[];
    queues text[];
BEGIN
    IF extra_attempts IS NULL OR extra_attempts < 1 THEN
        RAISE EXCEPTION 'extra_attempts must be at least 1' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- Jobs without a dedupe key: one statement, then one wake-up per queue.
    WITH picked AS (
        SELECT j.id FROM jobs j
        WHERE j.state = 'dead' AND j.dedupe_key IS NULL
          AND (jobrunner_retry_dead.queue IS NULL OR j.queue = jobrunner_retry_dead.queue)
          AND (jobrunner_retry_dead.kind IS NULL OR j.kind = jobrunner_retry_dead.kind)
        ORDER BY j.id
        FOR UPDATE SKIP LOCKED
    ), upd AS (
        UPDATE jobs j
        SET state = 'queued', run_at = now(),
            max_attempts = GREATEST(j.max_attempts, j.attempts + extra_attempts),
            finished_at = NULL, lease_expires_at = NULL, heartbeat_at = NULL,
            worker_id = NULL, cancel_requested = false
        FROM picked
        WHERE j.id = picked.id
        RETURNING j.id, j.queue
    )
    SELECT coalesce(array_agg(upd.id ORDER BY upd.id), '{}'), coalesce(array_agg(DISTINCT upd.queue), '{}')
    INTO ids, queues
    FROM upd;
    PERFORM pg_notify('jobrunner_jobs', q) FROM unnest(queues) AS q;
    RETURN QUERY SELECT unnest(ids);
    -- Jobs with a dedupe key, one at a time: the key may be held by an active job (or by
    -- another dead job retried just before); those stay dead.
    FOR d IN
        SELECT j.id, j.queue FROM jobs j
        WHERE j.state = 'dead' AND j.dedupe_key IS NOT NULL
          AND (jobrunner_retry_dead.queue IS NULL OR j.queue = jobrunner_retry_dead.queue)
          AND (jobrunner_retry_dead.kind IS NULL OR j.kind = jobrunner_retry_dead.kind)
        ORDER BY j.id
        FOR UPDATE SKIP LOCKED
    LOOP
        BEGIN
            UPDATE jobs j
            SET state = 'queued', run_at = now(),
                max_attempts = GREATEST(j.max_attempts, j.attempts + extra_attempts),
                finished_at = NULL, lease_expires_at = NULL, heartbeat_at = NULL,
                worker_id = NULL, cancel_requested = false
            WHERE j.id = d.id;
            PERFORM pg_notify('jobrunner_jobs', d.queue);
            job_id := d.id;
            RETURN NEXT;
        EXCEPTION WHEN unique_violation THEN
            NULL;  -- the key is taken: leave this one dead
        END;
    END LOOP;
END
$$;

COMMENT ON FUNCTION jobrunner_retry_dead(text, text, integer) IS
    'Retry every dead job (of a queue and/or kind, if given); returns the ids put back to queued.';


-- Cancel a job: queued or failed (waiting for a retry) -> cancelled at once; running ->
-- cancel_requested, its worker told (the task stops if it checks; the job then ends
-- cancelled); finished jobs are returned unchanged. jobrunner.queue.cancel() calls this.
CREATE FUNCTION jobrunner_cancel(job_id bigint)
RETURNS SETOF jobs
LANGUAGE plpgsql
AS $$
DECLARE
    j jobs;
BEGIN
    SELECT * INTO j FROM jobs WHERE id = job_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no job with id %', job_id USING ERRCODE = 'no_data_found';
    END IF;
    IF j.state IN ('queued', 'failed') THEN
        UPDATE jobs
        SET state = 'cancelled', finished_at = now(), lease_expires_at = NULL,
            cancel_requested = true
        WHERE id = job_id
        RETURNING * INTO j;
        PERFORM pg_notify('jobrunner_done',
                          json_build_object('id', j.id, 'state', j.state)::text);
    ELSIF j.state = 'running' THEN
        UPDATE jobs SET cancel_requested = true WHERE id = job_id RETURNING * INTO j;
        PERFORM pg_notify('jobrunner_cancel', j.id::text);
    END IF;
    RETURN NEXT j;
END
$$;

COMMENT ON FUNCTION jobrunner_cancel(bigint) IS
    'Queued/failed -> cancelled; running -> cancel requested (cooperative); finished: unchanged.';


-- Discard a finished job (succeeded, dead or cancelled): deleted with its result.
-- Returns the deleted row. Active jobs are refused: cancel them first.
CREATE FUNCTION jobrunner_discard(job_id bigint)
RETURNS SETOF jobs
LANGUAGE plpgsql
AS $$
DECLARE
    j jobs;
BEGIN
    SELECT * INTO j FROM jobs WHERE id = job_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no job with id %', job_id USING ERRCODE = 'no_data_found';
    END IF;
    IF j.state NOT IN ('succeeded', 'dead', 'cancelled') THEN
        RAISE EXCEPTION 'job % is %: only finished jobs (succeeded, dead, cancelled) can be discarded; cancel it first',
            job_id, j.state USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    DELETE FROM jobs WHERE id = job_id;
    RETURN NEXT j;
END
$$;

COMMENT ON FUNCTION jobrunner_discard(bigint) IS
    'Delete a finished (succeeded, dead, cancelled) job and its result.';
