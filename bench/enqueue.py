"""Scenario 2: enqueue throughput.

- Bulk: `enqueue_many` of N jobs in one call and one transaction (best of the repeats),
  timed from the call to the commit's return.
- Transactional: 16 concurrent writers (processes, one connection each), each looping
  `enqueue(...)` + COMMIT for a fixed time; jobs/s over all writers. In the same run the
  same writers insert the same row into a copy of the jobs table that has the per-row
  NOTIFY trigger design (AFTER INSERT FOR EACH ROW -> pg_notify), and, as the floor, into
  jobs with no notification at all, and a proposal: a NOTIFY debounced across processes
  (at most one per 5 ms per queue; see `debounce_design_insert` in sql/queries/bench.sql).
  Each design runs `repeats` times, interleaved; the best of each is reported.
"""
from __future__ import annotations

import multiprocessing as mp
import time

import psycopg
from psycopg.types.json import Jsonb

from jobrunner import queue

from .common import Q, Settings, metric, reset_jobs

TARGET_BULK_JOBS_PER_S = 100_000
TARGET_TRIGGER_RATIO = 3.0
DESIGNS = ("jobrunner", "per-row trigger", "no notify", "debounced notify")
_SQL_OF = {"per-row trigger": "trigger_design_insert", "no notify": "plain_insert",
           "debounced notify": "debounce_design_insert"}


def _one(design: str, conn: psycopg.Connection) -> None:
    if design == "jobrunner":
        queue.enqueue("jobrunner.noop", {}, conn=conn)
    else:
        conn.execute(Q[_SQL_OF[design]],
                     {"queue": "default", "kind": "jobrunner.noop", "args": Jsonb({})})
    conn.commit()


def _writer(url: str, design: str, seconds: float, barrier, out) -> None:
    try:
        with psycopg.connect(url) as conn:
            _one(design, conn)  # warm: connection, prepared plans
            barrier.wait(60)
            count = 0
            started = time.perf_counter()
            deadline = started + seconds
            while time.perf_counter() < deadline:
                _one(design, conn)
                count += 1
            out.put((count, time.perf_counter() - started, None))
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        out.put((0, 0.0, repr(exc)))


def writers_run(url: str, design: str, writers: int, seconds: float) -> float:
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(writers)
    out = ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(url, design, seconds, barrier, out))
             for _ in range(writers)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120 + seconds) for _ in procs]
    for p in procs:
        p.join(30)
    errors = [e for _, _, e in results if e]
    if errors:
        raise RuntimeError(f"writer failed ({design}): {errors[0]}")
    # Each writer's rate, summed: writers start together at the barrier.
    return sum(count / elapsed for count, elapsed, _ in results)


def bulk(url: str, n: int, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        reset_jobs(url)
        args = [{} for _ in range(n)]
        with psycopg.connect(url) as conn:
            started = time.perf_counter()
            ids = queue.enqueue_many("jobrunner.noop", args, conn=conn)
            conn.commit()
            times.append(time.perf_counter() - started)
        if len(ids) != n:
            raise RuntimeError(f"enqueue_many returned {len(ids)} ids for {n} jobs")
    return times


def run(url: str, s: Settings) -> dict:
    n = s.size(100_000, 5_000)
    repeats = s.size(3, 1)
    writers = 16
    seconds = s.size(4, 1)
    rounds = s.size(3, 1)
    times = bulk(url, n, repeats)
    bulk_rate = n / min(times)
    s.log(f"  enqueue_many: {bulk_rate:,.0f} jobs/s (best of {repeats})")

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(Q["trigger_design_drop"])
        conn.execute(Q["trigger_design_create"])
        conn.execute(Q["debounce_design_drop"])
        conn.execute(Q["debounce_design_create"])
    rates: dict[str, list[float]] = {d: [] for d in DESIGNS}
    try:
        for _ in range(rounds):
            for design in DESIGNS:
                reset_jobs(url)
                with psycopg.connect(url, autocommit=True) as conn:
                    conn.execute("TRUNCATE bench_trigger_jobs")
                rates[design].append(writers_run(url, design, writers, seconds))
                s.log(f"  {writers} writers, {design}: {rates[design][-1]:,.0f} jobs/s")
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(Q["trigger_design_drop"])
            conn.execute(Q["debounce_design_drop"])
        reset_jobs(url)
    best = {d: max(r) for d, r in rates.items()}
    ratio = best["jobrunner"] / best["per-row trigger"] if best["per-row trigger"] else None
    return {
        "scenario": "bulk enqueue",
        "method": (f"enqueue_many of {n:,} jobs, call to commit, best of {repeats}; "
                   f"{writers} writer processes x {seconds} s of enqueue()+COMMIT per job, {rounds} rounds, "
                   "against a per-row NOTIFY trigger copy of the table, a no-notify insert and a "
                   "debounced-NOTIFY proposal (interleaved, best of each)"),
        "enqueue_many_s": times,
        "writers": writers,
        "writer_seconds": seconds,
        "transactional_jobs_per_s": rates,
        "metrics": [
            metric("enqueue_many jobs/s", bulk_rate, "jobs/s", target=TARGET_BULK_JOBS_PER_S, op=">="),
            metric("16 writers, enqueue() jobs/s", best["jobrunner"], "jobs/s"),
            metric("16 writers, per-row trigger jobs/s", best["per-row trigger"], "jobs/s"),
            metric("16 writers, no NOTIFY jobs/s", best["no notify"], "jobs/s"),
            metric("enqueue() vs per-row trigger", ratio, "x", target=TARGET_TRIGGER_RATIO, op=">="),
            metric("16 writers, debounced NOTIFY (proposal) jobs/s", best["debounced notify"], "jobs/s"),
            metric("debounced NOTIFY (proposal) vs per-row trigger",
                   best["debounced notify"] / best["per-row trigger"] if best["per-row trigger"] else None,
                   "x"),
        ],
    }
