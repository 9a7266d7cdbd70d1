-- The migrator's bookkeeping (jobrunner/migrate.py). The migrations themselves are the
-- numbered files sql/NNN_name.sql.

-- name: lock
SELECT pg_advisory_lock(%(key)s)

-- name: unlock
SELECT pg_advisory_unlock(%(key)s)

-- name: create_migrations_table
CREATE TABLE IF NOT EXISTS schema_migrations (
    version integer PRIMARY KEY,
    name text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)

-- name: migrations_table_exists
SELECT to_regclass('schema_migrations') IS NOT NULL

-- name: applied_versions
SELECT version FROM schema_migrations

-- name: record
INSERT INTO schema_migrations (version, name) VALUES (%(version)s, %(name)s)
