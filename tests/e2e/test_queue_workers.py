"""Real `jobrunner worker` processes against a real Postgres."""
from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from jobrunner import config, queue
from tests.workers import count_jobs, start_worker, wait_until  # noqa: F401 - start_worker is a fixture

pytestmark = pytest.mark.e2e


def test_10k_noop_jobs_on_4_workers_each_succeed_exactly_once(conn, start_worker):
    ids = queue.enqueue_many("jobrunner.noop", [{"i": i} for i in range(10_000)], conn=conn)
    workers = [start_worker("--concurrency", "4", "--poll-interval", "0.5") for _ in range(4)]
    wait_until(lambda: count_jobs(conn, "succeeded") == 10_000, timeout=120,
               interval=0.2, what="10,000 jobs to succeed")
    rows = conn.execute("SELECT count(*), count(DISTINCT job_id), min(attempts), max(attempts) "
                        "FROM results").fetchone()
    assert rows == (10_000, 10_000, 1, 1)
    assert conn.execute("SELECT min(attempts), max(attempts), count(DISTINCT worker_id) "
                        "FROM jobs").fetchone()[:2] == (1, 1)
    assert conn.execute("SELECT count(*) FROM jobs WHERE id = ANY(%s) AND errors <> '[]'",
                        (ids,)).fetchone()[0] == 0
    for w in workers:
        w.signal(signal.SIGTERM)
    assert [w.wait(30) for w in workers] == [0, 0, 0, 0]
    # Every job was run by one of these workers. (Not necessarily by all of them: on a busy
    # machine the first worker up can drain the queue before the others claim anything.)
    prefixes = tuple(w.id_prefix for w in workers)
    holders = [row[0] for row in conn.execute("SELECT DISTINCT worker_id FROM jobs")]
    assert holders and all(h.startswith(prefixes) for h in holders), holders


def test_notified_enqueue_is_picked_up_well_before_the_poll_interval(conn, start_worker):
    worker = start_worker("--concurrency", "2", "--poll-interval", "10")
    worker.wait_listening()
    wait_until(lambda: "queues=default" in worker.log(), what="worker started")
    job = queue.enqueue("jobrunner.noop", conn=conn)
    # With only polling this would take up to 10 s; the NOTIFY wakes the worker at once.
    wait_until(lambda: queue.get(job.id, conn=conn).state == "succeeded", timeout=5,
               what="the notified job to finish")
    worker.signal(signal.SIGTERM)
    assert worker.wait(30) == 0


def test_cli_enqueue_and_prune(db_url, conn):
    env = {"DATABASE_URL": db_url, "PATH": "/usr/bin:/bin"}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "jobrunner", *args], env=env,
                              cwd=config.ROOT, capture_output=True, text=True, timeout=60)

    one = cli("enqueue", "jobrunner.sleep", "--args", '{"seconds": 0}', "--priority", "3")
    assert one.returncode == 0, one.stderr
    job = queue.get(json.loads(one.stdout)["id"], conn=conn)
    assert job.args == {"seconds": 0} and job.priority == 3
    many = cli("enqueue", "jobrunner.noop", "--count", "25", "--delay", "1h")
    assert many.returncode == 0 and json.loads(many.stdout)["count"] == 25
    bad = cli("enqueue", "jobrunner.noop", "--args", "{nope")
    assert bad.returncode == 2 and "not JSON" in bad.stderr and "Traceback" not in bad.stderr
    conn.execute("UPDATE jobs SET state = 'succeeded', finished_at = now() - interval '8 days' "
                 "WHERE kind = 'jobrunner.noop'")
    pruned = cli("prune", "--older-than", "7d")
    assert pruned.returncode == 0 and "pruned 25" in pruned.stdout
    assert count_jobs(conn) == 1
    assert cli("prune", "--older-than", "soon").returncode == 2
    env["DATABASE_URL"] = "postgresql://nobody@127.0.0.1:1/none"
    down = cli("enqueue", "jobrunner.noop")
    assert down.returncode == 1 and "unavailable" in down.stderr and "Traceback" not in down.stderr
