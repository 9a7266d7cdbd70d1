"""Scenario 3: pickup latency.

W idle `jobrunner worker` processes (listening). One producer enqueues
`jobrunner.noop` jobs one at a time, each in its own transaction, at a steady rate
(200/s); the wall-clock time is taken right after each COMMIT returns. The task's start
is the job's started_at (set by the claim, the statement that hands the job to a slot),
read back from the database. Both clocks are this machine's clock. Latency = started_at
- commit time, per job: p50, p95, p99, max.
"""
from __future__ import annotations

import time

import psycopg

from jobrunner import queue

from .common import Q, Settings, distribution_ms, metric, reset_jobs, unfinished, wait_for, workers

TARGET_P50_MS = 5.0
TARGET_P99_MS = 25.0
RATE = 200.0


def produce(url: str, n: int, rate: float) -> tuple[dict[int, tuple[float, float]], float]:
    """Enqueue n jobs one per transaction at `rate`; {id: (clock before COMMIT, clock
    after COMMIT returned)} and the rate achieved."""
    committed: dict[int, tuple[float, float]] = {}
    interval = 1.0 / rate
    with psycopg.connect(url) as conn:
        queue.enqueue("jobrunner.noop", {}, conn=conn)   # warm the connection and plans
        conn.rollback()
        start = time.perf_counter()
        for i in range(n):
            due = start + i * interval
            pause = due - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
            job = queue.enqueue("jobrunner.noop", {}, conn=conn)
            before = time.time()
            conn.commit()
            committed[job.id] = (before, time.time())
        elapsed = time.perf_counter() - start
    return committed, n / elapsed


def run(url: str, s: Settings) -> dict:
    n = s.size(3_000, 300)
    reset_jobs(url)
    with workers(url, s.workers, s.concurrency, "--poll-interval", "1") as procs:
        time.sleep(0.5)  # idle: listeners settled
        committed, achieved_rate = produce(url, n, RATE)
        wait_for(lambda: unfinished(url) == 0, 120, what="the pickup jobs to finish")
        alive = all(p.alive() for p in procs)
    with psycopg.connect(url) as conn:
        started = dict(conn.execute(Q["started_at_epochs"], {"ids": list(committed)}).fetchall())
    # The job becomes visible near the end of the COMMIT call (after its WAL flush). The
    # headline is measured from the moment COMMIT returned to the producer; on a busy
    # machine the producer may be scheduled late after that, while a worker already
    # claimed the job, which gives negative values (counted). Measured from the moment
    # before COMMIT was sent, the figures include the commit's own duration (the WAL
    # flush): an upper bound, reported beside.
    latencies = [started[i] - t for i, (_, t) in committed.items() if i in started]
    before = [started[i] - b for i, (b, _) in committed.items() if i in started]
    dist = distribution_ms(latencies)
    dist_before = distribution_ms(before)
    commit_ms = distribution_ms([t - b for b, t in committed.values()])
    negative = sum(1 for v in latencies if v < 0)
    s.log(f"  p50 {dist['p50_ms']:.2f} ms  p95 {dist['p95_ms']:.2f} ms  p99 {dist['p99_ms']:.2f} ms"
          f"  max {dist['max_ms']:.2f} ms  ({achieved_rate:.0f} jobs/s offered)")
    return {
        "scenario": "pickup latency",
        "method": (f"{s.workers} idle workers (--concurrency {s.concurrency}); {n:,} jobs enqueued "
                   f"one per transaction at {RATE:.0f}/s; started_at (claim) minus the producer's "
                   "clock right after COMMIT returned; from just before COMMIT (an upper bound "
                   "that includes the commit's WAL flush) reported beside"),
        "jobs": n,
        "offered_rate": achieved_rate,
        "latency": dist,
        "negative_latencies": negative,
        "latency_from_before_commit": dist_before,
        "commit_duration": commit_ms,
        "workers_alive": alive,
        "metrics": [
            metric("p50", dist["p50_ms"], "ms", target=TARGET_P50_MS, op="<="),
            metric("p95", dist["p95_ms"], "ms"),
            metric("p99", dist["p99_ms"], "ms", target=TARGET_P99_MS, op="<="),
            metric("max", dist["max_ms"], "ms"),
            metric("p50 from before COMMIT (upper bound)", dist_before["p50_ms"], "ms"),
            metric("p99 from before COMMIT (upper bound)", dist_before["p99_ms"], "ms"),
            metric("commit duration p50", commit_ms["p50_ms"], "ms"),
            metric("negative (producer scheduled late)", negative, "jobs"),
        ],
    }
