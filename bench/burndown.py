"""Scenario 1: queue burn-down.

N `jobrunner.noop` jobs are enqueued in bulk (enqueue_many), the table vacuumed, then
worked by W real `python -m jobrunner worker` processes. Throughput is N divided by the
window from the first claim (min started_at) to the last finish (max finished_at), as
the database recorded them. In the same run the naive baseline (bench/naive.py: claim
LIMIT 1, one transaction per job, W processes with the same number of slots each) works
the same N jobs, and the ratio is reported.
"""
from __future__ import annotations

import sys
import time
from contextlib import nullcontext

import psycopg

from jobrunner import queue

from .common import (Q, CpuWindow, Process, Settings, child_env, metric, profiled, reset_jobs,
                     unfinished, wait_for, workers)

TARGET_JOBS_PER_S = 10_000
TARGET_RATIO = 5.0


def _fill(url: str, n: int) -> float:
    reset_jobs(url)
    with psycopg.connect(url) as conn:
        started = time.perf_counter()
        queue.enqueue_many("jobrunner.noop", [{}] * n, conn=conn)
        conn.commit()
        seconds = time.perf_counter() - started
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM (ANALYZE) jobs")
    return seconds


def _summary(url: str, n: int) -> dict:
    with psycopg.connect(url) as conn:
        succeeded, other, retried, seconds, results = conn.execute(Q["burn_down_summary"]).fetchone()
    return {"jobs": n, "succeeded": succeeded, "not_succeeded": other, "retried": retried,
            "result_rows": results, "seconds": seconds,
            "jobs_per_s": (succeeded / seconds) if seconds else None}


def run_ours(url: str, n: int, count: int, concurrency: int, timeout: float,
             s: Settings | None = None) -> dict:
    fill_s = _fill(url, n)
    with workers(url, count, concurrency, "--poll-interval", "1", wait_listening=False) as procs:
        def done() -> bool:
            for proc in procs:
                if not proc.alive():
                    raise RuntimeError(f"worker died:\n{proc.log()[-3000:]}")
            return unfinished(url) == 0

        # CPU is counted once the workers are past their imports and start claiming
        # (they log their configuration right before the first claim).
        try:
            wait_for(lambda: all("concurrency=" in p.log() or not p.alive() for p in procs) or
                     unfinished(url) == 0, 60, interval=0.01, what="the workers to start")
        except TimeoutError:
            pass  # the log line changed: CPU then includes the workers' start-up
        cpu = CpuWindow({f"worker{i}": p.pid for i, p in enumerate(procs)}, url).start()
        with profiled(s, procs[0].pid, "burn-down-worker0") if s else nullcontext():
            wait_for(done, timeout, interval=0.2, what="the burn-down")
        cpu_figures = cpu.stop()
    figures = _summary(url, n)
    figures.update(enqueue_many_s=fill_s, workers=count, concurrency=concurrency,
                   cpu=cpu_figures)
    _cpu_per_job(figures)
    return figures


def run_naive(url: str, n: int, count: int, slots: int, timeout: float) -> dict:
    _fill(url, n)
    procs = [Process([sys.executable, "-m", "bench.naive", "work", "--slots", str(slots)],
                     child_env(url), f"naive{i}") for i in range(count)]
    cpu = CpuWindow({f"worker{i}": p.pid for i, p in enumerate(procs)}, url).start()
    try:
        def done() -> bool:
            if all(not p.alive() for p in procs):
                return True
            # Read the children's CPU while they live (a reaped process has no /proc).
            cpu_figures.update(cpu.stop())
            return False

        cpu_figures: dict = {}
        wait_for(done, timeout, interval=0.2, what="the naive burn-down")
        for p in procs:
            if p.popen.returncode != 0:
                raise RuntimeError(f"naive worker failed:\n{p.log()[-3000:]}")
    finally:
        for p in procs:
            p.cleanup()
    figures = _summary(url, n)
    figures.update(workers=count, slots_per_worker=slots, cpu=cpu_figures)
    _cpu_per_job(figures)
    return figures


def _cpu_per_job(figures: dict) -> None:
    """CPU (workers + PostgreSQL) per job: a figure much less sensitive than jobs/s to
    what else runs on the machine."""
    cpu = figures.get("cpu") or {}
    ours = sum(v for k, v in cpu.items() if k.startswith("worker") and k.endswith("_cpu_s"))
    if "postgres_cpu_s" in cpu and figures["succeeded"]:
        figures["cpu_us_per_job"] = (ours + cpu["postgres_cpu_s"]) / figures["succeeded"] * 1e6
    else:
        figures["cpu_us_per_job"] = None


def run(url: str, s: Settings) -> dict:
    n = s.size(100_000, 5_000)
    naive_slots = s.extra.get("naive_slots", 4)
    ours = run_ours(url, n, s.workers, s.concurrency, timeout=600, s=s)
    s.log(f"  ours:  {ours['jobs_per_s']:,.0f} jobs/s ({ours['seconds']:.2f} s)")
    naive = run_naive(url, n, s.workers, naive_slots, timeout=1800)
    s.log(f"  naive: {naive['jobs_per_s']:,.0f} jobs/s ({naive['seconds']:.2f} s)")
    ratio = (ours["jobs_per_s"] / naive["jobs_per_s"]) if ours["jobs_per_s"] and naive["jobs_per_s"] else None
    correct = (ours["succeeded"] == n and ours["result_rows"] == n and ours["retried"] == 0
               and naive["succeeded"] == n)
    return {
        "scenario": "burn-down",
        "method": (f"{n:,} jobrunner.noop jobs via enqueue_many, VACUUM ANALYZE, then "
                   f"{s.workers} `jobrunner worker` processes (--concurrency {s.concurrency}); "
                   "jobs/s = succeeded / (max finished_at - min started_at). Naive baseline: "
                   f"{s.workers} processes x {naive_slots} slots, LIMIT 1 claim, one transaction "
                   "per job (bench/naive.py), same jobs"),
        "ours": ours,
        "naive": naive,
        "metrics": [
            metric("jobs/s", ours["jobs_per_s"], "jobs/s", target=TARGET_JOBS_PER_S, op=">="),
            metric("naive jobs/s", naive["jobs_per_s"], "jobs/s"),
            metric("ratio to naive", ratio, "x", target=TARGET_RATIO, op=">="),
            metric("every job succeeded once", int(correct), "bool", target=1, op=">="),
            metric("CPU per job, workers + PostgreSQL", ours["cpu_us_per_job"], "us"),
            metric("naive CPU per job, workers + PostgreSQL", naive["cpu_us_per_job"], "us"),
            metric("machine busy during ours (all processes)",
                   (ours["cpu"].get("machine_busy_fraction") or 0) * 100, "%"),
        ],
    }
