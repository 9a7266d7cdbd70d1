"""Tasks: plain functions registered by name.

    from jobrunner.tasks import task, current_job

    @task("emails.send", max_attempts=3, timeout=60, backoff=(2, 300))
    def send(to: str, subject: str) -> dict:
        ...
        if current_job().cancel_requested():
            raise JobCancelled()        # or current_job().raise_if_cancelled()
        return {"sent": True}

A job's `args` are passed as keyword arguments (a JSON object) or positional arguments
(a JSON array). Args that do not fit the function's signature, or a PermanentFailure
raised by the task, make the job dead at once; any other exception is a failed attempt,
retried with exponential backoff and jitter until max_attempts. The return value must be
JSON-serialisable: it is stored in `results`.
"""
from __future__ import annotations

import inspect
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import JobCancelled, PermanentFailure

DEFAULT_BACKOFF = (1.0, 300.0)


@dataclass(frozen=True)
class Task:
    name: str
    fn: Callable[..., Any]
    max_attempts: int | None = None      # None: the queue default (5)
    timeout: float | None = None         # seconds; None: no limit
    backoff: tuple[float, float] = DEFAULT_BACKOFF  # (base, cap) seconds
    inline: bool = False                 # trivially fast: run on the dispatching thread
    signature: inspect.Signature | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.signature is None:
            object.__setattr__(self, "signature", inspect.signature(self.fn))

    def retry_delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds before the attempt after `attempt` (1-based): base * 2**(attempt-1),
        at most cap, with +-20% jitter so failing jobs do not retry in lockstep."""
        base, cap = self.backoff
        raw = min(cap, base * (2 ** max(0, attempt - 1)))
        return raw * (rng or random).uniform(0.8, 1.2)

    def bind(self, args: Any) -> inspect.BoundArguments:
        """Check args against the signature; PermanentFailure if they can never fit."""
        sig = self.signature
        try:
            if not args and isinstance(args, (dict, list, type(None))):
                # No arguments (no-op benchmarks send {}): bind once, reuse (read-only).
                empty = self.__dict__.get("_empty_binding")
                if empty is None:
                    empty = sig.bind()
                    object.__setattr__(self, "_empty_binding", empty)
                return empty
            if isinstance(args, dict):
                return sig.bind(**args)
            if isinstance(args, list):
                return sig.bind(*args)
        except TypeError as exc:
            raise PermanentFailure(f"task {self.name!r} rejected its args: {exc}") from None
        raise PermanentFailure(f"task {self.name!r} rejected its args: args must be a JSON "
                               f"object (keyword arguments) or array (positional arguments)")


_registry: dict[str, Task] = {}
_lock = threading.Lock()


def task(name: str, *, max_attempts: int | None = None, timeout: float | None = None,
         backoff: tuple[float, float] = DEFAULT_BACKOFF, inline: bool = False):
    """Register the decorated function as the task `name`."""
    if max_attempts is not None and max_attempts < 1:
        raise ValueError("max_attempts must be at least 1")
    if timeout is not None and timeout <= 0:
        raise ValueError("timeout must be positive")
    base, cap = backoff
    if base < 0 or cap < base:
        raise ValueError("backoff must be (base, cap) with 0 <= base <= cap")

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        with _lock:
            _registry[name] = Task(name, fn, max_attempts, timeout, (float(base), float(cap)),
                                   inline)
        return fn

    return register


def registry() -> dict[str, Task]:
    return dict(_registry)


def get_task(name: str) -> Task:
    """The registered task; PermanentFailure for an unknown name."""
    found = _registry.get(name)
    if found is None:
        raise PermanentFailure(f"unknown task {name!r}: no task of that name is registered "
                               f"in this worker")
    return found


# --- the running job ------------------------------------------------------------------

@dataclass
class JobContext:
    """What a running task may know about its job; see current_job()."""

    id: int
    kind: str
    queue: str
    args: Any
    attempt: int                 # 1-based number of this attempt
    max_attempts: int
    worker_id: str
    database_url: str | None = None
    _cancel: threading.Event = field(default_factory=threading.Event, repr=False)

    def cancel_requested(self) -> bool:
        """True once someone cancelled this job (or the worker gave it up: timeout,
        shutdown past the grace period, lost lease)."""
        return self._cancel.is_set()

    def raise_if_cancelled(self) -> None:
        if self._cancel.is_set():
            raise JobCancelled(f"job {self.id} was cancelled")

    def sleep(self, seconds: float) -> None:
        """Sleep, but raise JobCancelled as soon as the job is cancelled."""
        if self._cancel.wait(seconds):
            raise JobCancelled(f"job {self.id} was cancelled")


_current = threading.local()


def current_job() -> JobContext:
    """The job the calling thread runs; RuntimeError outside a task."""
    ctx = getattr(_current, "job", None)
    if ctx is None:
        raise RuntimeError("current_job() called outside a running task")
    return ctx


def _set_current(ctx: JobContext | None) -> None:
    _current.job = ctx


# --- built-in tasks --------------------------------------------------------------------

def _number(value: Any, what: str, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
        raise PermanentFailure(f"{what} must be a number >= {minimum:g}")
    return float(value)


@task("jobrunner.noop", inline=True)
def noop(**_ignored: Any) -> None:
    """Does nothing (benchmarks, smoke tests)."""
    return None


@task("jobrunner.sleep")
def sleep(seconds: float = 1.0) -> dict:
    """Sleeps `seconds` (stops early, cancelled, if the job is cancelled)."""
    seconds = _number(seconds, "seconds")
    try:
        ctx = current_job()
    except RuntimeError:
        time.sleep(seconds)
    else:
        ctx.sleep(seconds)
    return {"slept": seconds}


@task("jobrunner.fail", backoff=(0.2, 2.0))
def fail(message: str = "jobrunner.fail always fails") -> None:
    """Always raises (tests and drills of the retry path; short backoff)."""
    raise RuntimeError(str(message))


@task("report.payments", max_attempts=3, timeout=600, backoff=(2.0, 60.0))
def report_payments() -> dict:
    """Each user's total payment, from the orders of the worker's database. A job
    cancelled before the aggregation starts does not run it; one cancelled while it runs
    ends cancelled, its result discarded."""
    from . import aggregate, db

    try:
        ctx: JobContext | None = current_job()
    except RuntimeError:
        ctx = None
    if ctx is not None:
        ctx.raise_if_cancelled()
    data = aggregate.payments((ctx.database_url if ctx else None) or db.database_url())
    if ctx is not None:
        ctx.raise_if_cancelled()
    return {"data": data}
