-- Queries of the operations view: /metrics (jobrunner/metrics.py) and the dashboard
-- (api/dashboard.py).

-- name: queue_figures
-- Everything /metrics reports about the queue, read at scrape time in one pass over jobs:
-- jobs per queue, kind and state, and per group the age of the oldest job that is due to
-- run (queued, or failed and waiting for its retry, with run_at reached): now() - run_at.
-- Jobs scheduled for later are not late, so they do not count towards that age.
SELECT queue,
       kind,
       state,
       count(*) AS jobs,
       extract(epoch FROM now() - min(run_at) FILTER (
           WHERE state IN ('queued', 'failed') AND run_at <= now()))::float8 AS oldest_due_age_seconds
FROM jobs
GROUP BY queue, kind, state

-- name: throughput
-- Jobs that reached a final state per time bucket of %(bucket)s seconds over the last
-- %(window)s seconds, oldest bucket first; empty buckets are returned as zeros. Reads
-- jobs_finished_idx (finished_at over the final states).
WITH span AS (
    SELECT make_interval(secs => %(bucket)s) AS step,
           date_bin(make_interval(secs => %(bucket)s), now() - make_interval(secs => %(window)s),
                    TIMESTAMPTZ '2000-01-01 00:00:00+00') AS first_bucket,
           date_bin(make_interval(secs => %(bucket)s), now(),
                    TIMESTAMPTZ '2000-01-01 00:00:00+00') AS last_bucket
), done AS (
    SELECT date_bin(span.step, j.finished_at, TIMESTAMPTZ '2000-01-01 00:00:00+00') AS bucket,
           j.state,
           count(*) AS n
    FROM jobs j, span
    WHERE j.state IN ('succeeded', 'dead', 'cancelled')
      AND j.finished_at >= span.first_bucket
    GROUP BY 1, 2
)
SELECT b.bucket,
       COALESCE(sum(d.n) FILTER (WHERE d.state = 'succeeded'), 0)::bigint AS succeeded,
       COALESCE(sum(d.n) FILTER (WHERE d.state = 'dead'), 0)::bigint AS dead,
       COALESCE(sum(d.n) FILTER (WHERE d.state = 'cancelled'), 0)::bigint AS cancelled
FROM span,
     generate_series(span.first_bucket, span.last_bucket, span.step) AS b(bucket)
     LEFT JOIN done d ON d.bucket = b.bucket
GROUP BY b.bucket
ORDER BY b.bucket
