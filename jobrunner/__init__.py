"""jobrunner: a Postgres-only job queue."""
