"""Failed jobs: inspect and repair (the CLI's failed/retry/cancel/stats and the admin API).

The repairs are SQL functions (sql/004_failed_jobs.sql: jobrunner_retry,
jobrunner_retry_dead, jobrunner_cancel, jobrunner_discard), so an operator at a psql
prompt, this module and the HTTP API run the very same code, row lock included. This
module only validates input, calls the named queries of sql/queries/admin.sql and turns
the functions' SQLSTATEs into domain exceptions (`sql_errors()`).

Every function takes an optional `conn=` (sync psycopg), like jobrunner.queue.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from decimal import Decimal
from typing import Any

import psycopg
import psycopg.errors
from psycopg.rows import dict_row

from . import errors, queue
from .sqlfile import queries

_Q = queries("admin")

MAX_LIMIT = 500
DEFAULT_LIMIT = 50
# The fields of a job in the admin API's JSON (and `jobrunner failed --json`).
JOB_FIELDS = ("id", "queue", "kind", "args", "state", "priority", "attempts", "max_attempts",
              "run_at", "created_at", "started_at", "finished_at", "last_error", "errors",
              "worker_id")


@contextmanager
def sql_errors(job_id: Any = None) -> Iterator[None]:
    """Map the SQLSTATEs the failed-jobs functions raise to domain exceptions."""
    try:
        yield
    except psycopg.errors.NoDataFound:
        raise errors.JobNotFound(job_id) from None
    except (psycopg.errors.ObjectNotInPrerequisiteState, psycopg.errors.UniqueViolation) as exc:
        raise errors.Conflict(_message(exc)) from None
    except psycopg.errors.InvalidParameterValue as exc:
        raise errors.InvalidInput(_message(exc)) from None


def _message(exc: psycopg.Error) -> str:
    diag = getattr(exc, "diag", None)
    return (diag.message_primary if diag is not None and diag.message_primary else str(exc))


# --- validation --------------------------------------------------------------------------

def check_job_id(value: Any) -> int:
    """A job id from user input (int or decimal string); InvalidInput otherwise.
    Ids beyond bigint cannot exist: JobNotFound."""
    if isinstance(value, str):
        text = value.strip()
        if not text.isdigit() or not text.isascii():
            raise errors.InvalidInput(f"job id must be a positive integer, not {value!r}")
        value = int(text)
    if isinstance(value, bool) or not isinstance(value, int):
        raise errors.InvalidInput("job id must be a positive integer")
    if value < 1:
        raise errors.InvalidInput(f"job id must be a positive integer, not {value}")
    if value >= 2**63:
        raise errors.JobNotFound(value)
    return value


def check_state(value: str | None) -> str | None:
    if value is None:
        return None
    if value not in queue.STATES:
        raise errors.InvalidInput(f"state must be one of {', '.join(queue.STATES)}; not {value!r}")
    return value


def check_name(value: str | None, what: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not 1 <= len(value) <= 200:
        raise errors.InvalidInput(f"{what} must be 1 to 200 characters")
    if queue.has_control_chars(value):
        raise errors.InvalidInput(f"{what} must not contain NUL or other control characters")
    return value


def check_limit(value: Any, maximum: int = MAX_LIMIT) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= maximum:
        raise errors.InvalidInput(f"limit must be an integer from 1 to {maximum}")
    return value


# --- JSON ------------------------------------------------------------------------------

def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    return value


def job_json(row: dict[str, Any] | queue.Job) -> dict[str, Any]:
    """A job as the admin API shows it (JOB_FIELDS; times as ISO 8601 strings)."""
    if isinstance(row, queue.Job):
        row = row.__dict__
    return {name: _plain(row.get(name)) for name in JOB_FIELDS}


def row_json(row: dict[str, Any]) -> dict[str, Any]:
    return {key: _plain(value) for key, value in row.items()}


# --- reading ---------------------------------------------------------------------------

@contextmanager
def _cursor(conn: psycopg.Connection | None):
    with queue._connection(conn) as c:
        with c.cursor(row_factory=dict_row) as cur:
            yield cur


def list_jobs(*, state: str | None = None, queue_name: str | None = None,
              kind: str | None = None, limit: int = DEFAULT_LIMIT, after: int = 0,
              conn: psycopg.Connection | None = None) -> tuple[list[dict], int | None]:
    """One page of jobs by id: (rows, id to pass as `after` for the next page, or None)."""
    params = list_params(state=state, queue_name=queue_name, kind=kind, limit=limit, after=after)
    with _cursor(conn) as cur:
        rows = cur.execute(_Q["list_jobs"], params).fetchall()
    return page(rows, params["limit"])


def list_params(*, state: str | None, queue_name: str | None, kind: str | None, limit: int,
                after: int) -> dict[str, Any]:
    if isinstance(after, bool) or not isinstance(after, int) or not 0 <= after < 2**63:
        raise errors.InvalidInput("after must be a job id (a non-negative integer)")
    return {"state": check_state(state), "queue": check_name(queue_name, "queue"),
            "kind": check_name(kind, "kind"), "limit": check_limit(limit), "after": after}


def page(rows: list[dict], limit: int) -> tuple[list[dict], int | None]:
    if len(rows) > limit:
        rows = rows[:limit]
        return rows, rows[-1]["id"]
    return rows, None


def failed_jobs(*, queue_name: str | None = None, kind: str | None = None,
                limit: int = 1000, conn: psycopg.Connection | None = None) -> list[dict]:
    """Rows of the failed_jobs view (oldest id first)."""
    params = {"queue": check_name(queue_name, "queue"), "kind": check_name(kind, "kind"),
              "limit": check_limit(limit, 100_000)}
    with _cursor(conn) as cur:
        return cur.execute(_Q["failed_jobs"], params).fetchall()


def stats(conn: psycopg.Connection | None = None) -> list[dict]:
    """Rows of the queue_stats view: queue, state, count, oldest_age_seconds."""
    with _cursor(conn) as cur:
        return [{**row, "oldest_age_seconds": float(row["oldest_age_seconds"])}
                for row in cur.execute(_Q["stats"]).fetchall()]


# --- repairs ---------------------------------------------------------------------------

def retry(job_id: Any, conn: psycopg.Connection | None = None) -> queue.Job:
    """Dead or failed -> queued now (jobrunner_retry). JobNotFound; Conflict when the job
    is in another state (e.g. running: it is never taken from its worker)."""
    job_id = check_job_id(job_id)
    with queue._transaction(conn) as c, sql_errors(job_id):
        with c.cursor(row_factory=dict_row) as cur:
            row = cur.execute(_Q["retry"], {"id": job_id}).fetchone()
    return queue._job(row)


def retry_dead(*, queue_name: str | None = None, kind: str | None = None,
               conn: psycopg.Connection | None = None) -> list[int]:
    """Every dead job (of a queue and/or kind) -> queued; returns their ids."""
    params = {"queue": check_name(queue_name, "queue"), "kind": check_name(kind, "kind")}
    with queue._transaction(conn) as c, sql_errors():
        return [row[0] for row in c.execute(_Q["retry_dead"], params).fetchall()]


def cancel(job_id: Any, conn: psycopg.Connection | None = None) -> queue.Job:
    """jobrunner.queue.cancel (which calls jobrunner_cancel) with input validation."""
    return queue.cancel(check_job_id(job_id), conn=conn)


def discard(job_id: Any, conn: psycopg.Connection | None = None) -> queue.Job:
    """Delete a finished job and its result (jobrunner_discard); returns the deleted row.
    JobNotFound; Conflict for an active job."""
    job_id = check_job_id(job_id)
    with queue._transaction(conn) as c, sql_errors(job_id):
        with c.cursor(row_factory=dict_row) as cur:
            row = cur.execute(_Q["discard"], {"id": job_id}).fetchone()
    return queue._job(row)
