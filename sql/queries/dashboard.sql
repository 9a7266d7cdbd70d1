-- Queries of the dashboard's own admin endpoints (api/dashboard.py); the rest of what the
-- page shows comes from the admin API (sql/queries/admin.sql) and the report API v2.

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

-- name: latest_report
-- The most recent succeeded payments report with its result (JSON text, passed through
-- unparsed). Walks jobs_finished_idx backwards from the newest finished job.
SELECT j.id, j.finished_at, r.attempts, r.result::text AS result_json
FROM jobs j
JOIN results r ON r.job_id = j.id
WHERE j.kind = %(kind)s AND j.state = 'succeeded'
ORDER BY j.finished_at DESC
LIMIT 1
