"""Every Prometheus metric of the project, defined in this one module.

Each metric is documented in docs/operations.md (Metrics); a test checks that what the
processes expose and what the document lists are the same set of names.

Two kinds of figures:

- **Queue-level** (`jobrunner_jobs`, `jobrunner_queue_oldest_job_age_seconds`,
  `jobrunner_dead_jobs`, `jobrunner_queue_stats_up`): read from the database when
  /metrics is scraped (one query, `queue_figures` in sql/queries/metrics.sql), so they
  are true whichever process serves them. `queue_families(rows)` turns the rows into
  metric families.
- **Process-level**: counters, gauges and histograms the worker and the API update as
  they work (the definitions below).

Multiprocess mode: prometheus-client picks its value store when it is first imported.
When PROMETHEUS_MULTIPROC_DIR is set then (gunicorn.conf.py sets it before the API's
workers import anything), every gunicorn worker writes its figures to files there and
`exposition()` adds them up across processes. A `jobrunner worker` process serves its
own figures on `--metrics-port` in single-process mode.
"""
from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    start_http_server,
)
from prometheus_client import disable_created_metrics
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

# `*_created` timestamps double the series and no query of ours needs them.
disable_created_metrics()

STATES = ("queued", "running", "succeeded", "failed", "dead", "cancelled")

# --- worker ------------------------------------------------------------------------------

JOBS_FINISHED = Counter(
    "jobrunner_jobs_finished",
    "Jobs this worker brought to a final state, by queue, kind and outcome "
    "(succeeded, dead, cancelled).",
    ["queue", "kind", "outcome"])

FAILED_ATTEMPTS = Counter(
    "jobrunner_job_failed_attempts",
    "Failed attempts this worker recorded (each one retried later or, the last one, dead), "
    "by queue, kind and error type.",
    ["queue", "kind", "error_type"])

PICKUP_LATENCY = Histogram(
    "jobrunner_job_pickup_latency_seconds",
    "Seconds from a job being due (run_at) to its claim by this worker.",
    ["queue"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600))

RUN_SECONDS = Histogram(
    "jobrunner_job_run_seconds",
    "Seconds a task ran on this worker (every attempt, whatever its outcome).",
    ["queue", "kind"],
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800))

CLAIM_BATCH = Histogram(
    "jobrunner_claim_batch_size",
    "Jobs claimed by one claim statement that found work (empty polls are not counted).",
    ["queue"],
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000))

# --- worker and API ----------------------------------------------------------------------

LISTENER_RECONNECTS = Counter(
    "jobrunner_listener_reconnects",
    "Times a LISTEN connection was re-established after it was lost (role: worker or api).",
    ["role"])

# --- API ---------------------------------------------------------------------------------

LONGPOLL_WAITERS = Gauge(
    "jobrunner_longpoll_waiters",
    "Clients waiting right now in a v2 long-poll (summed over the live API processes).",
    multiprocess_mode="livesum")

API_REQUESTS = Counter(
    "api_requests",
    "HTTP requests answered, by method, route template and status code.",
    ["method", "route", "status"])

API_REQUEST_SECONDS = Histogram(
    "api_request_duration_seconds",
    "Seconds from a request's arrival to its answer (long-polls included), by method and "
    "route template.",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))


# --- recording functions (keep the call sites one line long) -------------------------------

def observe_claim(queue: str, claimed: Sequence[Any]) -> None:
    """A claim statement returned `claimed` (objects with `.waited`, seconds since due)."""
    if not claimed:
        return
    CLAIM_BATCH.labels(queue).observe(len(claimed))
    histogram = PICKUP_LATENCY.labels(queue)
    for job in claimed:
        waited = getattr(job, "waited", None)
        if waited is not None:
            histogram.observe(max(0.0, float(waited)))


def observe_outcomes(batch: Iterable[tuple], written: Any) -> None:
    """Count the outcomes of one completer batch that were actually written.

    `batch` holds (kind, job, payload) tuples as the worker queues them; `written` is
    jobrunner.queue.Finished (ids per outcome; jobs no longer held are absent from it)."""
    for kind, job, payload in batch:
        if kind == "succeeded":
            if job.id in written.succeeded:
                JOBS_FINISHED.labels(job.queue, job.kind, "succeeded").inc()
        elif kind == "failed":
            state = written.failed.get(job.id)
            if state is None:
                continue
            FAILED_ATTEMPTS.labels(job.queue, job.kind, payload.error_type).inc()
            if state in ("dead", "cancelled"):
                JOBS_FINISHED.labels(job.queue, job.kind, state).inc()
        elif kind == "cancelled":
            if job.id in written.cancelled:
                JOBS_FINISHED.labels(job.queue, job.kind, "cancelled").inc()


# --- queue-level figures, read at scrape time ----------------------------------------------

def queue_families(rows: Sequence[Sequence[Any]] | None) -> list[GaugeMetricFamily]:
    """Metric families from the rows of the `queue_figures` query (queue, kind, state,
    jobs, oldest_due_age_seconds); None means the database could not be read."""
    up = GaugeMetricFamily(
        "jobrunner_queue_stats_up",
        "1 when the queue-level figures of this scrape were read from the database, else 0 "
        "(and they are absent).")
    up.add_metric([], 0 if rows is None else 1)
    if rows is None:
        return [up]
    jobs: dict[tuple[str, str], int] = defaultdict(int)
    dead: dict[tuple[str, str], int] = defaultdict(int)
    oldest: dict[str, float] = defaultdict(float)
    for queue, kind, state, count, age in rows:
        jobs[(queue, state)] += int(count)
        dead[(queue, kind)] += int(count) if state == "dead" else 0
        if age is not None:
            oldest[queue] = max(oldest[queue], float(age))
    queues = sorted({queue for queue, _ in jobs})
    by_state = GaugeMetricFamily(
        "jobrunner_jobs", "Jobs in the database by queue and state (every state of every "
        "queue that has jobs, zeros included).", labels=["queue", "state"])
    age = GaugeMetricFamily(
        "jobrunner_queue_oldest_job_age_seconds",
        "Seconds the oldest due job of the queue has waited (now - run_at over queued jobs "
        "and failed jobs awaiting their retry, run_at reached); 0 when none is due.",
        labels=["queue"])
    for queue in queues:
        for state in STATES:
            by_state.add_metric([queue, state], jobs.get((queue, state), 0))
        age.add_metric([queue], round(oldest.get(queue, 0.0), 3))
    dead_jobs = GaugeMetricFamily(
        "jobrunner_dead_jobs", "Dead jobs (attempts exhausted or failed permanently) by queue "
        "and kind; 0 for kinds the queue has jobs of but none dead.", labels=["queue", "kind"])
    for (queue, kind), count in sorted(dead.items()):
        dead_jobs.add_metric([queue, kind], count)
    return [up, by_state, age, dead_jobs]


class _Families(Collector):
    def __init__(self, families: list) -> None:
        self.families = families

    def collect(self):
        return iter(self.families)


class _Delegate(Collector):
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self):
        return self.registry.collect()


def multiprocess_mode() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


def exposition(queue_rows: Sequence[Sequence[Any]] | None) -> tuple[bytes, str]:
    """(body, content type) of a scrape: this process's figures (all processes' in
    multiprocess mode) plus the queue-level figures from `queue_rows`."""
    registry = CollectorRegistry()
    if multiprocess_mode():
        multiprocess.MultiProcessCollector(registry)
    else:
        registry.register(_Delegate(REGISTRY))
    registry.register(_Families(queue_families(queue_rows)))
    return generate_latest(registry), CONTENT_TYPE_LATEST


def serve(port: int, addr: str = "127.0.0.1"):
    """Serve this process's figures over HTTP (a daemon thread): `jobrunner worker
    --metrics-port`. Returns (server, thread)."""
    return start_http_server(port, addr=addr, registry=REGISTRY)


def mark_process_dead(pid: int) -> None:
    """gunicorn child_exit: drop the live gauges of a worker process that exited."""
    if multiprocess_mode():
        multiprocess.mark_process_dead(pid)
