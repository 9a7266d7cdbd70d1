"""Report jobs as the v2 API sees them: submit (deduplicated, idempotent), read, cancel.

Everything runs on the API's async pool (api/db.py) with the named SQL of
sql/queries/reports_v2.sql and the queue's `cancel` (sql/queries/queue.sql). A job
submitted here is exactly what `jobrunner.queue.enqueue` would have made, NOTIFY
included; a submit is one statement on one pooled connection (the hot path of the API).

- Dedupe: every report job carries DEDUPE_KEY; the partial unique index over active
  jobs (jobs_dedupe_key_idx) lets only one be queued/running/failed at a time. A submit
  inserts with ON CONFLICT DO NOTHING and, when nothing was inserted, returns the active
  job from the same statement (running it again should that job not be visible yet or
  have finished in between): concurrent submits wait on the index entry of the first
  and end up with its job. Concurrent submits of one process share one statement
  (_SubmitBatches).
- Idempotency-Key: one statement in a transaction returns the key's job, or enqueues
  (or joins) the job and takes the key for it (INSERT ... ON CONFLICT DO NOTHING on its
  primary key). A concurrent request with the same key waits for that transaction,
  rolls its own work back and then finds the key's job. The key keeps pointing at its
  job after the job finished.

A JobView is one read of a job; its JSON body is built once and shared by every
response that shows the same read (thousands of long-poll waiters of one job).
"""
from __future__ import annotations

import asyncio
import json
import re
import weakref
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg.errors
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from jobrunner import errors, tasks
from jobrunner.queue import DEFAULT_MAX_ATTEMPTS, DEFAULT_QUEUE, FINAL_STATES
from jobrunner.sqlfile import queries

KIND = "report.payments"
DEDUPE_KEY = "report.payments"          # identical report jobs: one active at a time
IDEMPOTENCY_SCOPE = "report.payments"
STATUS_PATH = "/api/2.0/report/payments/{job_id}"

MAX_WAIT = 60.0
MAX_JOB_ID = 2**63 - 1
_JOB_ID = re.compile(r"[0-9]{1,19}")
_WAIT = re.compile(r"[0-9]{1,4}(\.[0-9]{1,6})?")       # plain decimal seconds
# Idempotency keys: 1..255 printable characters of a safe set (UUIDs, ULIDs, base64...).
IDEMPOTENCY_KEY = re.compile(r"[A-Za-z0-9._:+/=\-]{1,255}")

_SQL = queries("reports_v2")
_NO_ARGS = Jsonb({})
_QUEUE_SQL = queries("queue")


# --- input -------------------------------------------------------------------------

def parse_job_id(raw: str) -> int:
    """`"42"` -> 42; anything but 1..19 digits within bigint range -> InvalidJobId."""
    if not isinstance(raw, str) or not _JOB_ID.fullmatch(raw):
        raise errors.InvalidJobId(f"job id must be a positive integer, not {raw[:40]!r}")
    value = int(raw)
    if value > MAX_JOB_ID:
        raise errors.InvalidJobId("job id is out of range (at most 2^63-1)")
    return value


def parse_wait(values: list[str] | None) -> float | None:
    """The `wait` query parameter: None when absent, else seconds with 0 < wait <= 60."""
    if values is None:
        return None
    if len(values) != 1:
        raise errors.InvalidWait("give wait at most once")
    raw = values[0].strip()
    if not _WAIT.fullmatch(raw):
        raise errors.InvalidWait(f"wait must be a number of seconds, not {raw[:40]!r}")
    value = float(raw)
    if not 0 < value <= MAX_WAIT:
        raise errors.InvalidWait(f"wait must be more than 0 and at most {MAX_WAIT:g} seconds")
    return value


def check_idempotency_key(raw: str | None) -> str | None:
    if raw is None:
        return None
    if not IDEMPOTENCY_KEY.fullmatch(raw):
        raise errors.InvalidIdempotencyKey(
            "Idempotency-Key must be 1 to 255 characters of letters, digits and ._:+/=-")
    return raw


# --- views -------------------------------------------------------------------------

def status_url(job_id: int) -> str:
    return STATUS_PATH.format(job_id=job_id)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


@dataclass
class JobView:
    """One read of a report job."""

    id: int
    state: str
    attempts: int
    max_attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    last_error: str | None
    cancel_requested: bool
    result_json: str | None = None            # JSON text of the result (succeeded only)
    _body: bytes | None = field(default=None, repr=False, compare=False)

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    def summary(self) -> dict[str, Any]:
        return {"job_id": self.id, "status": self.state, "status_url": status_url(self.id)}

    def data(self) -> dict[str, Any]:
        """The `data` object of the status response (the result parsed, if any)."""
        out = self._fields()
        if self.state == "succeeded":
            out["result"] = json.loads(self.result_json) if self.result_json is not None else None
        return out

    def _fields(self) -> dict[str, Any]:
        return {
            "job_id": self.id,
            "status": self.state,
            "attempts": self.attempts,
            "max_attempts": self.max_attempts,
            "created_at": _iso(self.created_at),
            "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at),
            "last_error": self.last_error,
            "cancel_requested": self.cancel_requested,
            "status_url": status_url(self.id),
        }

    def body(self) -> bytes:
        """`{"data": {...}}` as JSON bytes, built once per read. The stored result's JSON
        text is spliced in as it is: no parse and re-dump of a large report."""
        if self._body is None:
            text = json.dumps({"data": self._fields()}, separators=(",", ":"))
            if self.state == "succeeded":
                assert text.endswith("}}")
                result = self.result_json if self.result_json is not None else "null"
                text = text[:-2] + ',"result":' + result + "}}"
            self._body = text.encode()
        return self._body


def _view(row: dict[str, Any]) -> JobView:
    return JobView(**row)


# --- reads -------------------------------------------------------------------------

async def read_job(db, job_id: int) -> JobView:
    """The report job; JobNotFound if there is none with this id."""
    async with db.connection() as conn:
        async with conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(_SQL["job"], {"id": job_id, "kind": KIND})
            row = await cur.fetchone()
    if row is None:
        raise errors.JobNotFound(job_id)
    return _view(row)


async def read_jobs(db, job_ids) -> dict[int, JobView]:
    """Many report jobs in one query: {id: view} (missing ids are absent)."""
    ids = list(job_ids)
    if not ids:
        return {}
    async with db.connection() as conn:
        async with conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(_SQL["jobs"], {"ids": ids, "kind": KIND})
            rows = await cur.fetchall()
    return {row["id"]: _view(row) for row in rows}


# --- writes ------------------------------------------------------------------------

def _max_attempts() -> int:
    registered = tasks.registry().get(KIND)
    value = registered.max_attempts if registered is not None else None
    return value or DEFAULT_MAX_ATTEMPTS


def _submit_params() -> dict[str, Any]:
    return {"queue": DEFAULT_QUEUE, "kind": KIND, "args": _NO_ARGS,
            "max_attempts": _max_attempts(), "dedupe_key": DEDUPE_KEY}


@dataclass(frozen=True, slots=True)
class Submitted:
    """The job a submit answers with: just what the 202 response shows."""

    id: int
    state: str

    def summary(self) -> dict[str, Any]:
        return {"job_id": self.id, "status": self.state, "status_url": status_url(self.id)}


class _SubmitBatches:
    """Submits without an Idempotency-Key of one process, coalesced: every request that
    arrives while a submit statement is running joins the next one, which starts when
    the running one is done; all of them answer with its job. Each batch's statement
    starts after all of its requests arrived, so each gets what a submit of its own
    would have: the job active at that moment, or a new one. A busy API thus runs one
    statement per database round trip instead of one per request."""

    def __init__(self, db) -> None:
        self.db = db
        self._open: asyncio.Future | None = None     # the batch that requests join now
        self._last: asyncio.Future | None = None     # the latest batch started

    async def submit(self) -> Submitted:
        batch = self._open
        if batch is None or batch.done():     # done: it failed before it started
            batch = self._open = asyncio.ensure_future(self._run(self._last))
            batch.add_done_callback(_retrieve)
            self._last = batch
        return await asyncio.shield(batch)

    async def _run(self, previous: asyncio.Future | None) -> Submitted:
        if previous is not None and not previous.done():
            await asyncio.wait([previous])
        self._open = None            # requests arriving from now on: the next batch
        return await _submit(self.db, None)


def _retrieve(future: asyncio.Future) -> None:
    """Mark a batch's exception as retrieved (its requests may all have gone away)."""
    if not future.cancelled():
        future.exception()


_batches: weakref.WeakKeyDictionary[Any, _SubmitBatches] = weakref.WeakKeyDictionary()


async def submit(db, idempotency_key: str | None = None) -> Submitted:
    """Submit a payments report job (or join the active one); see the module docstring.
    Concurrent submits without a key share one statement (_SubmitBatches)."""
    if idempotency_key is not None:
        return await _submit(db, idempotency_key)
    batches = _batches.get(db)
    if batches is None:
        batches = _batches[db] = _SubmitBatches(db)
    return await batches.submit()


async def _submit(db, idempotency_key: str | None) -> Submitted:
    """One pooled connection and one statement: without a key in autocommit, with a key
    in a transaction (BEGIN, the statement, COMMIT). The statement returns no row in the
    rare races described in sql/queries/reports_v2.sql; it is then run again."""
    params = _submit_params()
    async with db.connection() as conn:
        if idempotency_key is None:
            for _ in range(10):
                cur = await conn.execute(_SQL["submit"], params)
                row = await cur.fetchone()
                if row is not None:
                    return Submitted(row[0], row[1])
        else:
            params["scope"] = IDEMPOTENCY_SCOPE
            params["key"] = idempotency_key
            for _ in range(10):
                async with conn.transaction() as tx:
                    cur = await conn.execute(_SQL["submit_with_idempotency_key"], params)
                    row = await cur.fetchone()
                    if row is not None and row[2]:
                        return Submitted(row[0], row[1])
                    # Another request took the key first (or the active job was not
                    # visible yet): undo what this statement did and look again.
                    raise psycopg.Rollback(tx)
    raise errors.Conflict("could not submit the report job; try again")


async def cancel(db, job_id: int) -> JobView:
    """Cancel a report job: queued (or waiting for a retry) -> cancelled at once; running
    -> cancel requested (the worker stops it cooperatively); finished -> unchanged."""
    await read_job(db, job_id)  # 404 for unknown ids and for jobs that are not reports
    async with db.connection() as conn:
        try:
            async with conn.transaction():
                await conn.execute(_QUEUE_SQL["cancel"], {"id": job_id})
        except psycopg.errors.NoDataFound:       # deleted (pruned) meanwhile
            raise errors.JobNotFound(job_id) from None
    return await read_job(db, job_id)
