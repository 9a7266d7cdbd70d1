"""Domain exceptions, in one module.

The API maps these to HTTP errors in one place (api/errors.py); the CLI maps them to
exit statuses. Tasks raise the task-control ones to say what should happen to a job.
"""
from __future__ import annotations


class JobrunnerError(Exception):
    """Base of every error this project raises on purpose."""

    code = "error"


# --- errors a caller made or met ---------------------------------------------------

class InvalidInput(JobrunnerError):
    """Input that can never succeed as given (HTTP 400, CLI status 2)."""

    code = "invalid_input"


class InvalidJobId(InvalidInput):
    """A job id that is not a positive 64-bit integer (HTTP 400)."""

    code = "invalid_job_id"


class InvalidWait(InvalidInput):
    """A long-poll `wait` outside 0 < wait <= 60 seconds, or not a number (HTTP 400)."""

    code = "invalid_wait"


class InvalidIdempotencyKey(InvalidInput):
    """An Idempotency-Key header that is empty, too long or has odd characters (HTTP 400)."""

    code = "invalid_idempotency_key"


class NotFound(JobrunnerError):
    """The thing named does not exist (HTTP 404, CLI status 1)."""

    code = "not_found"


class JobNotFound(NotFound):
    code = "job_not_found"

    def __init__(self, job_id):
        super().__init__(f"no job with id {job_id}")
        self.job_id = job_id


class Conflict(JobrunnerError):
    """The request clashes with the current state (HTTP 409)."""

    code = "conflict"


class DatabaseUnavailable(JobrunnerError):
    """The database cannot be reached right now (HTTP 503 with Retry-After)."""

    code = "database_unavailable"


class MigrationsPending(DatabaseUnavailable):
    """The database lacks migrations this code needs (HTTP 503; run `make migrate`)."""

    code = "migrations_pending"


class ReportDataError(JobrunnerError):
    """The orders arrived in a shape the report cannot sum (schema drift, cut stream)."""

    code = "report_data_error"


# --- what a task says should happen to its job ---------------------------------------

class TaskControl(JobrunnerError):
    """Raised by a task to steer its job rather than to report a bug."""


class PermanentFailure(TaskControl):
    """The job can never succeed (bad args, unknown task): dead at once, no retry."""

    code = "permanent_failure"


class JobCancelled(TaskControl):
    """The task noticed its job was cancelled and stopped."""

    code = "cancelled"
