"""The worker: claims jobs in batches, runs them on execution slots, finishes them in
batches, heartbeats leases, and shuts down gracefully.

Threads of one worker process:
- the dispatcher (the thread that calls run()): claims up to the free slots in one
  statement per queue, hands jobs to slots (or runs trivially fast `inline` tasks itself),
  enforces timeouts; woken by NOTIFY, by a slot coming free, or every poll interval;
- `concurrency` slot threads running tasks;
- the completer: writes outcomes in batches (one transaction per batch), retrying with
  backoff while the database is away; guarded writes make retries harmless;
- the heartbeat: extends leases of held jobs, notices cancel requests and lost leases,
  marks dead the jobs whose worker died in their last attempt, prunes if configured;
- the listener (jobrunner.listener.Listener) on its own connection.

Connections come from one psycopg_pool.ConnectionPool (opened in run(), after any fork,
with check=ConnectionPool.check_connection); each role keeps its connection checked out
and swaps it for a fresh (checked) one after an error.
"""
from __future__ import annotations

import json
import logging
import os
import queue as stdqueue
import random
import secrets
import socket
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from . import config, db, metrics, queue, tasks
from .errors import JobCancelled, PermanentFailure
from .listener import Listener

log = logging.getLogger("jobrunner.worker")

DB_ERRORS = (psycopg.OperationalError, PoolTimeout)
INLINE_BATCH = 128  # claim size while the queue yields only inline (trivially fast) tasks


@dataclass
class WorkerConfig:
    queues: tuple[str, ...] = ("default",)
    concurrency: int = 8
    poll_interval: float = 1.0       # seconds between polls when no NOTIFY arrives
    lease: float = 30.0              # seconds a claim is valid without a heartbeat
    grace: float = 30.0              # seconds running jobs get to finish on shutdown
    listen: bool = True              # False: poll only (e.g. behind PgBouncer)
    max_batch: int = 1000            # most jobs claimed by one statement
    prune_older_than: float | None = None  # seconds; None: the worker does not prune
    prune_interval: float = 3600.0

    @classmethod
    def from_env(cls, **overrides: Any) -> "WorkerConfig":
        prune = config.env_str("JOBRUNNER_PRUNE_OLDER_THAN")
        values = dict(
            queues=tuple(q.strip() for q in config.env_str("JOBRUNNER_QUEUES", "default").split(",")
                         if q.strip()),
            concurrency=config.env_int("JOBRUNNER_CONCURRENCY", 8),
            poll_interval=config.env_float("JOBRUNNER_POLL_INTERVAL", 1.0),
            lease=config.env_float("JOBRUNNER_LEASE", 30.0),
            grace=config.env_float("JOBRUNNER_GRACE", 30.0),
            listen=config.env_str("JOBRUNNER_LISTEN", "1").lower() not in ("0", "false", "no"),
            prune_older_than=parse_duration(prune) if prune else None,
        )
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def validate(self) -> None:
        if not self.queues:
            raise ValueError("at least one queue")
        if self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if self.poll_interval <= 0 or self.lease <= 0 or self.grace < 0:
            raise ValueError("poll interval and lease must be positive, grace not negative")


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """'7d', '12h', '30m', '45s', '1.5' (seconds) -> seconds."""
    value = str(text).strip().lower()
    unit = 1
    if value and value[-1] in _UNITS:
        unit = _UNITS[value[-1]]
        value = value[:-1]
    try:
        seconds = float(value) * unit
    except ValueError:
        raise ValueError(f"not a duration: {text!r} (use e.g. 45s, 30m, 12h, 7d)") from None
    if not 0 <= seconds <= queue.MAX_SECONDS:   # also NaN and infinity
        raise ValueError(f"not a duration: {text!r} (at most about 100 years)")
    return seconds


@dataclass(eq=False)
class _Entry:
    """A claimed job inside this worker."""

    claimed: queue.Claimed
    task: tasks.Task | None
    ctx: tasks.JobContext
    bound: Any = None                # the args bound to the task's signature
    deadline: float | None = None    # monotonic; set when the task starts
    settled: bool = False            # an outcome was decided (by the task or the worker)
    abandoned: bool = False          # the worker gave up on the running task
    lock: threading.Lock = field(default_factory=threading.Lock)


class _RoleConnection:
    """A pool connection one thread keeps; replaced (with the pool's check) after errors."""

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool
        self.conn: psycopg.Connection | None = None

    def get(self) -> psycopg.Connection:
        if self.conn is None or self.conn.closed:
            self.conn = self.pool.getconn(timeout=2.0)
        return self.conn

    def discard(self) -> None:
        if self.conn is not None:
            try:
                self.pool.putconn(self.conn)  # the pool throws broken connections away
            except Exception:  # noqa: BLE001
                pass
            self.conn = None

    release = discard


class Worker:
    def __init__(self, url: str | None = None, cfg: WorkerConfig | None = None, *,
                 worker_id: str | None = None) -> None:
        self.url = url or db.database_url()
        self.cfg = cfg or WorkerConfig()
        self.cfg.validate()
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.stats: Counter[str] = Counter()
        self._stop = threading.Event()
        self._immediate = False
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._running: dict[int, _Entry] = {}   # occupying a slot (waiting or executing)
        self._held: dict[int, int] = {}         # id -> attempts: claimed, outcome not written
        self._todo: stdqueue.SimpleQueue[_Entry | None] = stdqueue.SimpleQueue()
        self._outcomes: stdqueue.SimpleQueue[tuple] = stdqueue.SimpleQueue()
        self._completer_stop = threading.Event()
        self._give_up_writing = threading.Event()
        self._threads: list[threading.Thread] = []
        self._slot_threads = 0
        self._pool: ConnectionPool | None = None
        self._listener: Listener | None = None
        self._rng = random.Random()
        self._max_held = max(4 * self.cfg.concurrency, 256)
        self.started = threading.Event()
        self.stopped = threading.Event()

    # --- public -----------------------------------------------------------------------

    def stop(self, *, immediate: bool = False) -> None:
        """Stop claiming and drain (within the grace period; immediate: no grace)."""
        if immediate:
            self._immediate = True
        self._stop.set()
        self._wake.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run(self) -> None:
        """Work until stop(); then drain, release what is left, and return."""
        cfg = self.cfg
        self._pool = ConnectionPool(
            self.url, min_size=3, max_size=4, open=False, timeout=2.0,
            check=ConnectionPool.check_connection, kwargs={"autocommit": True},
            name=f"jobrunner-worker-{os.getpid()}",
        )
        self._pool.open(wait=False)
        for _ in range(cfg.concurrency):
            self._start_slot()
        self._spawn(self._completer, "jobrunner-completer")
        self._spawn(self._heartbeat_loop, "jobrunner-heartbeat")
        if cfg.listen:
            self._listener = Listener(
                self.url, [queue.JOBS_CHANNEL, queue.CANCEL_CHANNEL], self._on_notify,
                on_reconnect=self._wake.set, role="worker").start()
        log.info("worker %s: queues=%s concurrency=%d poll=%.2fs lease=%.1fs listen=%s",
                 self.worker_id, ",".join(cfg.queues), cfg.concurrency, cfg.poll_interval,
                 cfg.lease, cfg.listen)
        self.started.set()
        try:
            self._dispatch_loop()
        finally:
            self._shutdown()
            self.stopped.set()

    # --- dispatching ------------------------------------------------------------------

    def _dispatch_loop(self) -> None:
        conn = _RoleConnection(self._pool)
        backoff = 0.0
        inline_streak = False
        try:
            while not self._stop.is_set():
                self._wake.clear()
                self._check_timeouts()
                with self._lock:
                    # Free slots, but never more claimed-and-unwritten jobs than the
                    # completer can keep up with (inline tasks free their slot at once).
                    room = self._max_held - len(self._held)
                    free = min(self.cfg.concurrency - len(self._running), room)
                    if inline_streak and free > 0:
                        # The last batch was all trivially fast inline tasks (no-ops):
                        # they never wait for a slot, so claim a bigger batch.
                        free = min(max(free, INLINE_BATCH), room)
                limit = min(free, self.cfg.max_batch)
                if limit > 0:
                    try:
                        claimed, inline_streak = self._claim_and_dispatch(conn.get(), limit)
                        backoff = 0.0
                    except (*DB_ERRORS, psycopg.errors.UndefinedTable) as exc:
                        conn.discard()
                        backoff = min(5.0, max(0.1, backoff * 2))
                        self.stats["db_errors"] += 1
                        hint = (" (the database is not migrated: run `make migrate` or "
                                "`python -m jobrunner.migrate`)"
                                if isinstance(exc, psycopg.errors.UndefinedTable) else "")
                        log.warning("worker: claim failed (%s)%s; retrying in %.1fs",
                                    str(exc).strip() or type(exc).__name__, hint, backoff)
                        self._stop.wait(backoff * self._rng.uniform(0.8, 1.2))
                        continue
                    if claimed == limit:
                        continue  # there may be more waiting
                self._wake.wait(self._wait_time())
        finally:
            conn.release()

    def _claim_and_dispatch(self, conn: psycopg.Connection, limit: int) -> tuple[int, bool]:
        """Claim up to `limit` jobs over the queues in order and start them. Each queue's
        batch is dispatched before the next claim, so an error never strands claimed jobs.
        Returns (how many, whether all ran inline)."""
        count, all_inline = 0, True
        for name in self.cfg.queues:
            got = queue.claim(conn, queue=name, limit=limit - count,
                              worker_id=self.worker_id, lease=self.cfg.lease)
            metrics.observe_claim(name, got)
            if got:
                with self._lock:
                    for job in got:
                        self._held[job.id] = job.attempts
                self.stats["claimed"] += len(got)
                count += len(got)
                for job in got:
                    all_inline = self._dispatch(job) and all_inline
            if count >= limit:
                break
        return count, all_inline and count > 0

    def _wait_time(self) -> float:
        timeout = self.cfg.poll_interval
        now = time.monotonic()
        with self._lock:
            for entry in self._running.values():
                if entry.deadline is not None:
                    timeout = min(timeout, max(0.0, entry.deadline - now) + 0.01)
        return timeout

    def _dispatch(self, job: queue.Claimed) -> bool:
        """Start a claimed job; True if it ran inline (or failed before it ran).

        A job that needs a slot when none is free (a big batch claimed after inline-only
        ones may hold slow jobs too) is given back at once, the attempt not counted, so
        it waits in the queue where an idle worker can take it rather than here."""
        ctx = tasks.JobContext(job.id, job.kind, job.queue, job.args, job.attempts,
                               job.max_attempts, self.worker_id, self.url)
        if job.cancel_requested:
            ctx._cancel.set()
        try:
            task = tasks.get_task(job.kind)
            bound = task.bind(job.args)
        except PermanentFailure as exc:
            self._outcomes.put(("failed", job, queue.Failure(
                job.id, job.attempts, "PermanentFailure", str(exc), None, permanent=True)))
            return True
        entry = _Entry(job, task, ctx, bound)
        if task.inline and task.timeout is None:
            with self._lock:
                self._running[job.id] = entry
            self._execute(entry)
            return True
        with self._lock:
            # Inline entries leave _running before _execute returns: the entries here
            # are the slots' (waiting or executing).
            surplus = len(self._running) >= self.cfg.concurrency
            if not surplus:
                self._running[job.id] = entry
        if surplus:
            self.stats["surplus_released"] += 1
            self._outcomes.put(("released", job, None))
            return False
        self._todo.put(entry)
        return False

    def _on_notify(self, notify: psycopg.Notify) -> None:
        if notify.channel == queue.JOBS_CHANNEL:
            if notify.payload in self.cfg.queues:
                self._wake.set()
        elif notify.channel == queue.CANCEL_CHANNEL:
            try:
                job_id = int(notify.payload)
            except ValueError:
                return
            with self._lock:
                entry = self._running.get(job_id)
            if entry is not None:
                entry.ctx._cancel.set()

    # --- execution --------------------------------------------------------------------

    def _start_slot(self) -> None:
        self._slot_threads += 1
        self._spawn(self._slot_loop, f"jobrunner-slot-{self._slot_threads}")

    def _slot_loop(self) -> None:
        while True:
            entry = self._todo.get()
            if entry is None:
                return
            if self._stop.is_set():
                # Claimed but not started when the shutdown began: give it back.
                self._settle(entry, ("released", entry.claimed, None))
                continue
            self._execute(entry)
            if entry.abandoned:
                return  # a replacement slot took over while this task overran

    def _execute(self, entry: _Entry) -> None:
        job, task, ctx = entry.claimed, entry.task, entry.ctx
        if ctx.cancel_requested():
            # Cancelled while it waited for a slot: do not start it.
            self._settle(entry, ("cancelled", job, None))
            return
        if task.timeout is not None:
            entry.deadline = time.monotonic() + task.timeout
            self._wake.set()  # let the dispatcher account for the deadline
        tasks._set_current(ctx)
        try:
            with metrics.RUN_SECONDS.labels(job.queue, job.kind).time():
                result = task.fn(*entry.bound.args, **entry.bound.kwargs)
            try:
                json.dumps(result)
            except (TypeError, ValueError) as exc:
                outcome = ("failed", job, queue.Failure(
                    job.id, job.attempts, "ResultNotSerialisable",
                    f"task {task.name!r} returned a value that is not JSON: {exc}",
                    None, permanent=True))
            else:
                outcome = ("succeeded", job, result)
        except JobCancelled:
            outcome = ("cancelled", job, None)
        except PermanentFailure as exc:
            outcome = ("failed", job, queue.Failure(
                job.id, job.attempts, type(exc).__name__, str(exc) or type(exc).__name__,
                traceback.format_exc(), permanent=True))
        except Exception as exc:  # noqa: BLE001 - any error of a task is a failed attempt
            outcome = ("failed", job, queue.Failure(
                job.id, job.attempts, type(exc).__name__, str(exc) or repr(exc),
                traceback.format_exc(), retry_in=task.retry_delay(job.attempts, self._rng)))
        finally:
            tasks._set_current(None)
        self._settle(entry, outcome)

    def _settle(self, entry: _Entry, outcome: tuple) -> bool:
        """Decide an entry's outcome once: the first of task, timeout, shutdown wins."""
        with entry.lock:
            if entry.settled:
                return False
            entry.settled = True
        with self._lock:
            self._running.pop(entry.claimed.id, None)
        self._outcomes.put(outcome)
        self._wake.set()
        return True

    def _check_timeouts(self) -> None:
        now = time.monotonic()
        with self._lock:
            overdue = [e for e in self._running.values()
                       if e.deadline is not None and e.deadline <= now]
        for entry in overdue:
            job = entry.claimed
            failure = queue.Failure(
                job.id, job.attempts, "TaskTimeout",
                f"task {job.kind!r} exceeded its timeout of {entry.task.timeout:g}s",
                None, retry_in=entry.task.retry_delay(job.attempts, self._rng))
            with entry.lock:
                if entry.settled:
                    continue
                entry.settled = entry.abandoned = True
            entry.ctx._cancel.set()  # a cooperative task stops; its late result is dropped
            with self._lock:
                self._running.pop(job.id, None)
            self._outcomes.put(("failed", job, failure))
            self.stats["timeouts"] += 1
            log.warning("worker: job %d (%s) timed out; its slot is replaced", job.id, job.kind)
            self._start_slot()

    # --- completion -------------------------------------------------------------------

    def _completer(self) -> None:
        conn = _RoleConnection(self._pool)
        try:
            while True:
                try:
                    first = self._outcomes.get(timeout=0.1)
                except stdqueue.Empty:
                    if self._completer_stop.is_set():
                        return
                    continue
                batch = [first]
                while len(batch) < 5000:
                    try:
                        batch.append(self._outcomes.get_nowait())
                    except stdqueue.Empty:
                        break
                self._write(conn, batch)
        finally:
            conn.release()

    def _write(self, conn: _RoleConnection, batch: list[tuple]) -> None:
        backoff = 0.1
        while True:
            try:
                self._write_once(conn.get(), batch)
                return
            except DB_ERRORS as exc:
                conn.discard()
                self.stats["db_errors"] += 1
                if self._give_up_writing.is_set():
                    log.error("worker: giving up writing %d outcomes (%s); their leases will "
                              "expire and other workers take them over", len(batch), exc)
                    return
                log.warning("worker: writing outcomes failed (%s); retrying in %.1fs",
                            str(exc).strip() or type(exc).__name__, backoff)
                time.sleep(backoff * self._rng.uniform(0.8, 1.2))
                backoff = min(5.0, backoff * 2)
            except psycopg.Error as exc:
                # Not the connection: something in the batch the database refuses (a result
                # it cannot store). Write one by one; the culprit fails permanently.
                conn.discard()
                if len(batch) == 1:
                    kind, job, payload = batch[0]
                    if kind == "succeeded":
                        batch = [("failed", job, queue.Failure(
                            job.id, job.attempts, "ResultNotStorable",
                            f"the result could not be stored: {exc}", None, permanent=True))]
                        continue
                    # Stop heartbeating it: its lease expires and the job is rescued
                    # (retried or marked dead) instead of staying running for ever.
                    with self._lock:
                        if self._held.get(job.id) == job.attempts:
                            del self._held[job.id]
                    self._wake.set()
                    self.stats["write_failed"] += 1
                    log.error("worker: cannot write outcome of job %d: %s; its lease will "
                              "expire", job.id, exc)
                    return
                for item in batch:
                    self._write(conn, [item])
                return

    def _write_once(self, conn: psycopg.Connection, batch: list[tuple]) -> None:
        succeeded, failed, cancelled, released = [], [], [], []
        for kind, job, payload in batch:
            if kind == "succeeded":
                succeeded.append((job.id, job.attempts, payload))
            elif kind == "failed":
                failed.append(payload)
            elif kind == "cancelled":
                cancelled.append((job.id, job.attempts))
            else:
                released.append((job.id, job.attempts))
        out = queue.finish(conn, self.worker_id, succeeded=succeeded, failed=failed,
                           cancelled=cancelled, released=released)
        metrics.observe_outcomes(batch, out)
        with self._lock:
            for _, job, _ in batch:
                if self._held.get(job.id) == job.attempts:
                    del self._held[job.id]
        self._wake.set()  # room under the held-jobs limit again
        self.stats["succeeded"] += len(out.succeeded)
        self.stats["cancelled"] += len(out.cancelled)
        self.stats["released"] += len(out.released)
        for state in out.failed.values():
            self.stats[state] += 1
        written = len(out.succeeded) + len(out.failed) + len(out.cancelled) + len(out.released)
        if written < len(batch):
            self.stats["discarded"] += len(batch) - written
            log.info("worker: %d outcomes discarded (jobs no longer held by this worker)",
                     len(batch) - written)

    # --- heartbeat, reaping, pruning -----------------------------------------------------

    def _heartbeat_loop(self) -> None:
        conn = _RoleConnection(self._pool)
        interval = max(0.2, min(self.cfg.lease / 3.0, 10.0))
        next_prune = time.monotonic()
        try:
            while not self._completer_stop.wait(interval):
                try:
                    c = conn.get()
                    self._heartbeat(c)
                    reaped = queue.reap_expired(c)
                    if reaped:
                        log.warning("worker: jobs lost by dead workers in their last attempt: %s",
                                    reaped)
                    if self.cfg.prune_older_than is not None and time.monotonic() >= next_prune:
                        next_prune = time.monotonic() + self.cfg.prune_interval
                        pruned = queue.prune(self.cfg.prune_older_than, conn=c)
                        if pruned:
                            log.info("worker: pruned %d finished jobs", pruned)
                except psycopg.Error as exc:
                    conn.discard()
                    log.warning("worker: heartbeat failed (%s)", str(exc).strip() or type(exc).__name__)
                except PoolTimeout as exc:
                    log.warning("worker: heartbeat failed (%s)", str(exc).strip() or type(exc).__name__)
        finally:
            conn.release()

    def _heartbeat(self, conn: psycopg.Connection) -> None:
        with self._lock:
            held = list(self._held.items())
        if not held:
            return
        alive = queue.heartbeat(conn, self.worker_id, held, self.cfg.lease)
        with self._lock:
            for job_id, attempts in held:
                entry = self._running.get(job_id)
                if entry is None or entry.claimed.attempts != attempts:
                    continue
                if alive.get(job_id) is not False:
                    # cancel requested (True) or lease lost (absent): ask the task to stop
                    entry.ctx._cancel.set()

    # --- shutdown ---------------------------------------------------------------------

    def _shutdown(self) -> None:
        log.info("worker %s: stopping (grace %.1fs)", self.worker_id,
                 0.0 if self._immediate else self.cfg.grace)
        if self._listener is not None:
            self._listener.stop()
        # Jobs that never started go back at once.
        while True:
            try:
                entry = self._todo.get_nowait()
            except stdqueue.Empty:
                break
            if entry is not None:
                self._settle(entry, ("released", entry.claimed, None))
        deadline = time.monotonic() + (0.0 if self._immediate else self.cfg.grace)
        while time.monotonic() < deadline and not self._immediate:
            with self._lock:
                if not self._running:
                    break
            self._wake.wait(0.05)
            self._wake.clear()
        with self._lock:
            left = list(self._running.values())
        for entry in left:
            with entry.lock:
                if entry.settled:
                    continue
                entry.settled = entry.abandoned = True
            entry.ctx._cancel.set()
            with self._lock:
                self._running.pop(entry.claimed.id, None)
            self._outcomes.put(("released", entry.claimed, None))
        if left:
            log.warning("worker: %d jobs did not finish within the grace period; released",
                        len(left))
        for _ in range(self._slot_threads):
            self._todo.put(None)
        # Let the completer write everything; give up after a while if the database is away.
        self._completer_stop.set()
        timer = threading.Timer(10.0, self._give_up_writing.set)
        timer.daemon = True
        timer.start()
        for thread in self._threads:
            if thread.name in ("jobrunner-completer", "jobrunner-heartbeat"):
                thread.join(15.0)
        timer.cancel()
        self._pool.close(timeout=2.0)
        log.info("worker %s: stopped; %s", self.worker_id,
                 ", ".join(f"{k}={v}" for k, v in sorted(self.stats.items())) or "no jobs")

    def _spawn(self, target, name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()
