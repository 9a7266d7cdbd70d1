"""The naive Postgres queue, as the burn-down's baseline: written plainly, the way a
first queue on Postgres usually looks.

- enqueue: one INSERT and one NOTIFY of its own for every job (two statements, one
  transaction per job);
- work: a loop per slot, each with its own connection; per job ONE transaction that
  claims the oldest runnable job with `LIMIT 1 ... FOR UPDATE SKIP LOCKED`, runs the
  task, marks the job succeeded, stores its result and notifies its completion.

It uses the same tables, the same task functions and the same completion NOTIFY as the
real worker, so the burn-down compares designs, not features.

    python -m bench.naive work --slots 4 [--queue default]

exits once the queue is empty; started_at and finished_at in the jobs table give the
burn-down window.
"""
from __future__ import annotations

import argparse
import os
import sys
import threading

import psycopg
from psycopg.types.json import Jsonb

from jobrunner import db, tasks
from jobrunner.sqlfile import queries

Q = queries("bench")


def enqueue(conn: psycopg.Connection, kind: str, args: dict | None = None,
            queue: str = "default") -> int:
    """One job in its own transaction, with its own NOTIFY."""
    with conn.transaction():
        job_id = conn.execute(Q["naive_enqueue"], {"queue": queue, "kind": kind,
                                                   "args": Jsonb(args or {})}).fetchone()[0]
        conn.execute(Q["naive_notify"], {"queue": queue})
    return job_id


def work_until_empty(url: str, queue: str = "default", worker_id: str = "naive") -> int:
    """One slot: claim one job per transaction until none is left; returns jobs done."""
    done = 0
    with psycopg.connect(url) as conn:
        while True:
            with conn.transaction():
                row = conn.execute(Q["naive_claim_and_start"],
                                   {"queue": queue, "worker_id": worker_id}).fetchone()
                if row is None:
                    return done
                job_id, kind, args = row
                task = tasks.get_task(kind)
                bound = task.bind(args)
                result = task.fn(*bound.args, **bound.kwargs)
                conn.execute(Q["naive_finish"], {"id": job_id})
                conn.execute(Q["naive_save_result"],
                             {"id": job_id, "result": None if result is None else Jsonb(result)})
                conn.execute(Q["naive_notify_done"], {"id": job_id})
            done += 1


def work(url: str, slots: int, queue: str = "default") -> int:
    counts = [0] * slots

    def slot(i: int) -> None:
        counts[i] = work_until_empty(url, queue, f"naive:{os.getpid()}:{i}")

    threads = [threading.Thread(target=slot, args=(i,)) for i in range(slots)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.naive")
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("work", help="work the queue until it is empty, then exit")
    w.add_argument("--slots", type=int, default=1)
    w.add_argument("--queue", default="default")
    args = p.parse_args(argv)
    done = work(db.database_url(), args.slots, args.queue)
    print(f"naive worker {os.getpid()}: {done} jobs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
