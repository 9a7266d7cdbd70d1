-- Report API v2: Idempotency-Key -> job.
--
-- A client that sends the same Idempotency-Key again (a retry after a timeout, a
-- double click) gets the job its first request created or joined, even after that job
-- finished. The key is taken (INSERT ... ON CONFLICT DO NOTHING) before the job is
-- enqueued, in the same transaction, so concurrent requests with one key wait for the
-- first and then read its job: the primary key, not a read-then-write, decides.
-- A key lives as long as its job: pruning the job frees the key.
CREATE TABLE idempotency_keys (
    scope       text        NOT NULL,      -- the operation, e.g. 'report.payments'
    key         text        NOT NULL,
    job_id      bigint      REFERENCES jobs (id) ON DELETE CASCADE,  -- set before commit
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (scope, key),
    CHECK (length(key) BETWEEN 1 AND 255)
);

-- The cascade from jobs (prune) looks keys up by job.
CREATE INDEX idempotency_keys_job_idx ON idempotency_keys (job_id);
