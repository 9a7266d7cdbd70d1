-- jobrunner: the job queue.
--
-- States:  queued    -> waiting to run (run_at may lie in the future)
--          running   -> claimed by worker_id until lease_expires_at (heartbeats extend it)
--          failed    -> an attempt failed; will be retried at run_at
--          succeeded -> done; its result is in `results`
--          dead      -> attempts exhausted, or a permanent failure (unknown task, bad args)
--          cancelled -> cancelled before it ran, or stopped cooperatively while running
--
-- The table is hot: every job is inserted once and updated two or three times within
-- seconds. fillfactor leaves room on each page so new row versions stay on the same page
-- (and heartbeats, which touch no indexed column, can be HOT updates); autovacuum is made
-- eager so dead row versions and index entries are reclaimed while they are few.
CREATE TABLE jobs (
    id                bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    queue             text        NOT NULL DEFAULT 'default',
    kind              text        NOT NULL,
    args              jsonb       NOT NULL DEFAULT '{}'::jsonb,
    state             text        NOT NULL DEFAULT 'queued'
                      CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'dead', 'cancelled')),
    priority          integer     NOT NULL DEFAULT 0,      -- lower runs first
    run_at            timestamptz NOT NULL DEFAULT now(),
    attempts          integer     NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    max_attempts      integer     NOT NULL DEFAULT 5 CHECK (max_attempts >= 1),
    lease_expires_at  timestamptz,
    heartbeat_at      timestamptz,
    worker_id         text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    started_at        timestamptz,                        -- start of the latest attempt
    finished_at       timestamptz,                        -- set in succeeded, dead, cancelled
    last_error        text,
    errors            jsonb       NOT NULL DEFAULT '[]'::jsonb,  -- one entry per failed attempt
    dedupe_key        text,
    cancel_requested  boolean     NOT NULL DEFAULT false,
    CHECK (length(queue) BETWEEN 1 AND 200),
    CHECK (length(kind) BETWEEN 1 AND 200)
) WITH (
    fillfactor = 70,
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_vacuum_insert_scale_factor = 0.05,
    autovacuum_analyze_scale_factor = 0.02,
    autovacuum_vacuum_cost_delay = 0
);

-- The claim: Limit -> LockRows -> Index Scan over only the claimable rows. It stays tiny
-- however many finished jobs the table holds.
CREATE INDEX jobs_claim_idx ON jobs (queue, priority, run_at, id)
    WHERE state IN ('queued', 'failed');

-- Rescue of jobs whose worker died (lease expired); also heartbeats and "running" counts.
CREATE INDEX jobs_running_idx ON jobs (queue, lease_expires_at)
    WHERE state = 'running';

-- At most one active job per dedupe key; finished jobs free the key.
CREATE UNIQUE INDEX jobs_dedupe_key_idx ON jobs (dedupe_key)
    WHERE dedupe_key IS NOT NULL AND state IN ('queued', 'running', 'failed');

-- Retention (prune) walks finished jobs by age.
CREATE INDEX jobs_finished_idx ON jobs (finished_at)
    WHERE state IN ('succeeded', 'dead', 'cancelled');

-- Written in the same transaction that marks the job succeeded.
CREATE TABLE results (
    job_id       bigint      PRIMARY KEY REFERENCES jobs (id) ON DELETE CASCADE,
    result       jsonb,
    attempts     integer     NOT NULL,
    finished_at  timestamptz NOT NULL DEFAULT now()
) WITH (
    autovacuum_vacuum_insert_scale_factor = 0.05
);
