-- Queries of GET /metrics (jobrunner/metrics.py, api/metrics.py).

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
