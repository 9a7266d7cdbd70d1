"""The queue's Python API: enqueue, enqueue_many, claim, finish, get, cancel, prune.

Every function takes an optional `conn=`: given one, it runs on that connection and
inside whatever transaction the caller has open (the job exists if and only if the
caller commits); without one, it borrows a connection from a small per-process pool
and commits at once.

The SQL lives in sql/queries/queue.sql.
"""
from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, fields
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg.pq import TransactionStatus
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from . import db, errors
from .sqlfile import queries

STATES = ("queued", "running", "succeeded", "failed", "dead", "cancelled")
ACTIVE_STATES = ("queued", "running", "failed")
FINAL_STATES = ("succeeded", "dead", "cancelled")
DEFAULT_QUEUE = "default"
DEFAULT_MAX_ATTEMPTS = 5
JOBS_CHANNEL = "jobrunner_jobs"
DONE_CHANNEL = "jobrunner_done"
CANCEL_CHANNEL = "jobrunner_cancel"


@dataclass
class Job:
    """A row of `jobs` (plus `result` from `results` when read with get())."""

    id: int
    queue: str
    kind: str
    args: Any
    state: str
    priority: int
    run_at: datetime
    attempts: int
    max_attempts: int
    lease_expires_at: datetime | None
    heartbeat_at: datetime | None
    worker_id: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    last_error: str | None
    errors: list = field(default_factory=list)
    dedupe_key: str | None = None
    cancel_requested: bool = False
    result: Any = None

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.isoformat() if isinstance(value, datetime) else value
        return out


_JOB_FIELDS = {f.name for f in fields(Job)}


def _job(row: dict[str, Any]) -> Job:
    return Job(**{k: v for k, v in row.items() if k in _JOB_FIELDS})


@dataclass(frozen=True)
class Claimed:
    """A job as a worker claimed it: what it needs to run it and to finish it."""

    id: int
    queue: str
    kind: str
    args: Any
    attempts: int           # with `worker_id`, the lease token of this attempt
    max_attempts: int
    cancel_requested: bool
    waited: float | None = None   # seconds from run_at to this claim (metrics)


# --- connections -----------------------------------------------------------------------

_pool = None
_pool_lock = threading.Lock()


def _default_pool():
    """A small pool for calls made without conn= (created on first use, per process)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            from psycopg_pool import ConnectionPool

            _pool = ConnectionPool(
                db.database_url(), min_size=1, max_size=4, open=False,
                check=ConnectionPool.check_connection, kwargs={"autocommit": True},
                name="jobrunner-queue",
            )
            _pool.open()
        return _pool


def close_default_pool() -> None:
    global _pool
    with _pool_lock:
        if _pool is not None:
            _pool.close()
            _pool = None


@contextmanager
def _connection(conn: psycopg.Connection | None) -> Iterator[psycopg.Connection]:
    if conn is not None:
        yield conn
        return
    with _default_pool().connection() as pooled:
        yield pooled


@contextmanager
def _transaction(conn: psycopg.Connection | None) -> Iterator[psycopg.Connection]:
    """The caller's transaction (if conn was given and one is open or will be opened
    implicitly), or a new one that commits at exit (pooled or autocommit connections).

    No savepoint is made inside a caller's transaction: Postgres deduplicates NOTIFYs
    per (sub)transaction, and a savepoint would also hide nothing we need."""
    if conn is not None and (not conn.autocommit
                             or conn.info.transaction_status != TransactionStatus.IDLE):
        yield conn
        return
    with _connection(conn) as c:
        with c.transaction():
            yield c


_Q = queries("queue")


# --- validation ------------------------------------------------------------------------

MAX_SECONDS = 100 * 366 * 86400  # about 100 years: the longest delay or age accepted


def _seconds(value: float | int | timedelta | None, what: str) -> float:
    if value is None:
        return 0.0
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise errors.InvalidInput(f"{what} must be a number of seconds or a timedelta")
    else:
        try:
            seconds = float(value)
        except OverflowError:
            seconds = math.inf
    if not math.isfinite(seconds) or abs(seconds) > MAX_SECONDS:
        raise errors.InvalidInput(f"{what} must be a finite number of seconds, "
                                  f"at most {MAX_SECONDS} (about 100 years)")
    return seconds


def has_control_chars(value: str) -> bool:
    """NUL (which PostgreSQL cannot store) or another control character."""
    return any(ord(ch) < 32 or 127 <= ord(ch) < 160 for ch in value)


def _check_name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= 200:
        raise errors.InvalidInput(f"{what} must be a non-empty string of at most 200 characters")
    if has_control_chars(value):
        raise errors.InvalidInput(f"{what} must not contain NUL or other control characters")
    return value


def _check_int(value: Any, what: str, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise errors.InvalidInput(f"{what} must be an integer")
    if minimum is not None and value < minimum:
        raise errors.InvalidInput(f"{what} must be at least {minimum}")
    if not -2**31 <= value < 2**31:
        raise errors.InvalidInput(f"{what} is out of range")
    return value


def _resolve_max_attempts(kind: str, max_attempts: int | None) -> int:
    if max_attempts is None:
        from . import tasks

        registered = tasks.registry().get(kind)
        max_attempts = registered.max_attempts if registered else None
        if max_attempts is None:
            max_attempts = DEFAULT_MAX_ATTEMPTS
    return _check_int(max_attempts, "max_attempts", 1)


def _check_run_at(run_at: datetime | None) -> datetime | None:
    if run_at is None:
        return None
    if not isinstance(run_at, datetime):
        raise errors.InvalidInput("run_at must be a datetime")
    if run_at.tzinfo is None:
        raise errors.InvalidInput("run_at must be timezone-aware")
    return run_at


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return any(_has_nul(v) for v in value)
    return False


def _args_json(args: Any, **dumps: Any) -> str:
    """JSON text of args that PostgreSQL's jsonb accepts: no NaN/Infinity (not JSON) and
    no NUL character in a string (jsonb cannot store \\u0000); InvalidInput otherwise."""
    try:
        text = json.dumps(args, allow_nan=False, **dumps)
    except (TypeError, ValueError, RecursionError) as exc:
        raise errors.InvalidInput(f"args must be JSON-serialisable: {exc}") from None
    if "\\u0000" in text and _has_nul(args):   # the cheap test first, then the exact one
        raise errors.InvalidInput("args must not contain the NUL character (\\u0000)")
    return text


def _dumps_args(args: Any) -> Any:
    _args_json(args)
    return args


# --- enqueue ---------------------------------------------------------------------------

def enqueue(kind: str, args: Any = None, *, queue: str = DEFAULT_QUEUE, priority: int = 0,
            run_at: datetime | None = None, delay: float | timedelta | None = None,
            max_attempts: int | None = None, dedupe_key: str | None = None,
            conn: psycopg.Connection | None = None) -> Job:
    """Add one job; with conn=, inside the caller's transaction.

    Lower `priority` runs first. `run_at` (aware datetime) or `delay` (seconds or
    timedelta) defer it. With a `dedupe_key` that an active (queued, running, failed) job
    already has, nothing is inserted and that job is returned.
    The queue's workers are woken by a NOTIFY on commit (deduplicated by Postgres, so a
    transaction wakes each queue at most once).
    """
    _check_name(kind, "kind")
    _check_name(queue, "queue")
    _check_int(priority, "priority")
    if run_at is not None and delay is not None:
        raise errors.InvalidInput("give run_at or delay, not both")
    if dedupe_key is not None:
        _check_name(dedupe_key, "dedupe_key")
    params = {
        "queue": queue, "kind": kind, "args": Jsonb(_dumps_args({} if args is None else args)),
        "priority": priority, "run_at": _check_run_at(run_at),
        "delay": _seconds(delay, "delay"),
        "max_attempts": _resolve_max_attempts(kind, max_attempts), "dedupe_key": dedupe_key,
    }
    with _transaction(conn) as c:
        with c.cursor(row_factory=dict_row) as cur:
            for _ in range(5):
                row = cur.execute(_Q["enqueue"], params).fetchone()
                if row is not None:
                    return _job(row)
                # The dedupe key is taken by an active job: return that one. If it just
                # finished (freeing the key), insert again.
                row = cur.execute(_Q["active_by_dedupe_key"], {"dedupe_key": dedupe_key}).fetchone()
                if row is not None:
                    return _job(row)
    raise errors.Conflict(f"could not enqueue with dedupe_key {dedupe_key!r}")


def enqueue_many(kind: str, args_list: Iterable[Any], *, queue: str = DEFAULT_QUEUE,
                 priority: int = 0, run_at: datetime | None = None,
                 delay: float | timedelta | None = None, max_attempts: int | None = None,
                 conn: psycopg.Connection | None = None) -> list[int]:
    """Add many jobs of one kind in one statement (one per element of args_list).

    Returns their ids in order. Sends one NOTIFY for the queue (if the jobs may run now).
    """
    _check_name(kind, "kind")
    _check_name(queue, "queue")
    _check_int(priority, "priority")
    if run_at is not None and delay is not None:
        raise errors.InvalidInput("give run_at or delay, not both")
    items = [{} if a is None else a for a in args_list]
    if not items:
        return []
    payload = _args_json(items, separators=(",", ":"))
    delay_s = _seconds(delay, "delay")
    params = {
        "queue": queue, "kind": kind, "args": payload, "priority": priority,
        "run_at": _check_run_at(run_at), "delay": delay_s,
        "max_attempts": _resolve_max_attempts(kind, max_attempts),
    }
    with _transaction(conn) as c:
        ids = [row[0] for row in c.execute(_Q["enqueue_many"], params)]
        now_runnable = (run_at is None and delay_s <= 0) or (
            run_at is not None and run_at <= datetime.now(run_at.tzinfo))
        if now_runnable:
            c.execute(_Q["notify_queue"], {"queue": queue})
    return ids


# --- reading and cancelling ---------------------------------------------------------------

def get(job_id: int, conn: psycopg.Connection | None = None) -> Job:
    """The job (with its result, if it succeeded); raises errors.JobNotFound."""
    if isinstance(job_id, bool) or not isinstance(job_id, int):
        raise errors.InvalidInput("job id must be an integer")
    if not 1 <= job_id < 2**63:
        raise errors.JobNotFound(job_id)
    with _connection(conn) as c:
        with c.cursor(row_factory=dict_row) as cur:
            row = cur.execute(_Q["get"], {"id": job_id}).fetchone()
    if row is None:
        raise errors.JobNotFound(job_id)
    return _job(row)


def cancel(job_id: int, conn: psycopg.Connection | None = None) -> Job:
    """Cancel a job. Queued or waiting-for-retry: `cancelled` at once. Running: marked
    cancel_requested and its worker told (the task stops if it checks; see
    jobrunner.tasks.current_job). Finished jobs are returned unchanged.
    Raises errors.JobNotFound."""
    if isinstance(job_id, bool) or not isinstance(job_id, int):
        raise errors.InvalidInput("job id must be an integer")
    if not 1 <= job_id < 2**63:
        raise errors.JobNotFound(job_id)
    with _transaction(conn) as c:
        try:
            c.execute(_Q["cancel"], {"id": job_id})  # jobrunner_cancel(), sql/004
        except psycopg.errors.NoDataFound:
            raise errors.JobNotFound(job_id) from None
        return get(job_id, conn=c)


# --- the worker's side -------------------------------------------------------------------

def claim(conn: psycopg.Connection, *, queue: str, limit: int, worker_id: str,
          lease: float) -> list[Claimed]:
    """Claim up to `limit` jobs of `queue` for `worker_id` with a lease of `lease` seconds
    (one statement; expired leases of dead workers are taken over first)."""
    if limit <= 0:
        return []
    with conn.cursor() as cur:
        cur.execute(_Q["claim"], {"queue": queue, "limit": limit, "worker_id": worker_id,
                                  "lease": float(lease)})
        return [Claimed(*row) for row in cur.fetchall()]


def complete(conn: psycopg.Connection, worker_id: str,
             items: Sequence[tuple[int, int, Any]]) -> set[int]:
    """Mark jobs succeeded and store their results: items are (id, attempts, result).
    Returns the ids written; the others were no longer held by this worker."""
    if not items:
        return set()
    ids, attempts, results = [], [], []
    for job_id, attempt, result in items:
        ids.append(job_id)
        attempts.append(attempt)
        results.append(None if result is None else json.dumps(result, separators=(",", ":")))
    rows = conn.execute(_Q["complete"], {"ids": ids, "attempts": attempts, "results": results,
                                         "worker_id": worker_id}, binary=True).fetchall()
    return {row[0] for row in rows}


@dataclass(frozen=True)
class Failure:
    id: int
    attempts: int
    error_type: str
    message: str
    traceback: str | None = None
    permanent: bool = False      # dead at once, no retry
    retry_in: float = 0.0        # seconds until the next attempt (if any is left)


# Caps of the error texts stored per attempt (characters; the tail of a traceback is kept).
ERROR_TYPE_MAX, MESSAGE_MAX, TRACEBACK_MAX = 200, 4096, 16384


def clean_text(value: Any, limit: int, *, keep_tail: bool = False) -> str | None:
    """Text the database can store: NUL (refused by text and jsonb) becomes U+FFFD,
    unpaired surrogates become '?', and it is cut to `limit` characters."""
    if value is None:
        return None
    text = str(value).replace("\x00", "\ufffd")
    text = text.encode("utf-8", "replace").decode("utf-8")
    if len(text) > limit:
        marker = "...[truncated]..."
        keep = max(0, limit - len(marker))
        text = marker + text[-keep:] if keep_tail else text[:keep] + marker
    return text


def fail(conn: psycopg.Connection, worker_id: str, items: Sequence[Failure]) -> dict[int, str]:
    """Record failed attempts; returns {id: new state} ('failed', 'dead' or 'cancelled')
    for the jobs this worker still held. Every error text is cleaned (clean_text) here,
    the one place failures are written from."""
    if not items:
        return {}
    payload = json.dumps([{
        "id": f.id, "attempts": f.attempts, "permanent": f.permanent, "retry_in": f.retry_in,
        "error_type": clean_text(f.error_type, ERROR_TYPE_MAX),
        "message": clean_text(f.message, MESSAGE_MAX),
        "traceback": clean_text(f.traceback, TRACEBACK_MAX, keep_tail=True),
    } for f in items], separators=(",", ":"))
    rows = conn.execute(_Q["fail"], {"items": payload, "worker_id": worker_id}).fetchall()
    return {row[0]: row[1] for row in rows}


def mark_cancelled(conn: psycopg.Connection, worker_id: str,
                   items: Sequence[tuple[int, int]]) -> set[int]:
    """Jobs whose task stopped on a cancel request: (id, attempts) -> cancelled."""
    if not items:
        return set()
    payload = json.dumps([{"id": i, "attempts": a} for i, a in items])
    rows = conn.execute(_Q["cancelled"], {"items": payload, "worker_id": worker_id}).fetchall()
    return {row[0] for row in rows}


def release(conn: psycopg.Connection, worker_id: str,
            items: Sequence[tuple[int, int]]) -> dict[int, str]:
    """Give held jobs back (shutdown): queued again, the attempt not counted."""
    if not items:
        return {}
    payload = json.dumps([{"id": i, "attempts": a} for i, a in items])
    rows = conn.execute(_Q["release"], {"items": payload, "worker_id": worker_id}).fetchall()
    return {row[0]: row[1] for row in rows}


def heartbeat(conn: psycopg.Connection, worker_id: str, held: Sequence[tuple[int, int]],
              lease: float) -> dict[int, bool]:
    """Extend the leases of held (id, attempts); returns {id: cancel_requested} for the
    jobs still held."""
    if not held:
        return {}
    rows = conn.execute(_Q["heartbeat"], {
        "ids": [i for i, _ in held], "attempts": [a for _, a in held],
        "worker_id": worker_id, "lease": float(lease),
    }).fetchall()
    return {row[0]: row[1] for row in rows}


def reap_expired(conn: psycopg.Connection) -> dict[int, str]:
    """Jobs whose worker died in their last attempt (or after a cancel request): dead or
    cancelled instead of run again."""
    return {row[0]: row[1] for row in conn.execute(_Q["reap_expired"]).fetchall()}


@dataclass
class Finished:
    """What finish() wrote: ids per outcome; jobs no longer held are simply absent."""

    succeeded: set[int] = field(default_factory=set)
    failed: dict[int, str] = field(default_factory=dict)
    cancelled: set[int] = field(default_factory=set)
    released: dict[int, str] = field(default_factory=dict)


def finish(conn: psycopg.Connection, worker_id: str, *,
           succeeded: Sequence[tuple[int, int, Any]] = (), failed: Sequence[Failure] = (),
           cancelled: Sequence[tuple[int, int]] = (),
           released: Sequence[tuple[int, int]] = ()) -> Finished:
    """Write a batch of outcomes in one transaction (one statement per outcome kind; a
    batch of one kind, the common case, is a single statement and round trip)."""
    out = Finished()
    kinds = sum(1 for group in (succeeded, failed, cancelled, released) if group)
    atomic = conn.transaction() if kinds > 1 else nullcontext()
    with atomic:
        out.succeeded = complete(conn, worker_id, succeeded)
        out.failed = fail(conn, worker_id, failed)
        out.cancelled = mark_cancelled(conn, worker_id, cancelled)
        out.released = release(conn, worker_id, released)
    return out


def prune(older_than: float | timedelta, *, batch_size: int = 5000,
          conn: psycopg.Connection | None = None) -> int:
    """Delete finished jobs (succeeded, dead, cancelled) that finished more than
    `older_than` ago, with their results, in batches of `batch_size` (each its own
    transaction unless conn= is inside one). Returns how many were deleted."""
    seconds = _seconds(older_than, "older_than")
    if seconds < 0:
        raise errors.InvalidInput("older_than must not be negative")
    if batch_size < 1:
        raise errors.InvalidInput("batch_size must be at least 1")
    total = 0
    with _connection(conn) as c:
        while True:
            with c.transaction():
                deleted = c.execute(_Q["prune"], {"older_than": seconds,
                                                  "batch": batch_size}).rowcount
            total += deleted
            if deleted < batch_size:
                return total
