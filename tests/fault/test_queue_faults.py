"""Worker processes killed, stopped and cut off from a restarting database."""
from __future__ import annotations

import signal
import time

import psycopg
import pytest

from jobrunner import queue
from tests.workers import count_jobs, start_worker, wait_until  # noqa: F401 - start_worker is a fixture

pytestmark = pytest.mark.fault


def test_sigkilled_worker_job_is_taken_over_after_the_lease(conn, start_worker):
    lease, poll = 2.0, 0.5
    args = ("--concurrency", "2", "--lease", str(lease), "--poll-interval", str(poll))
    workers = [start_worker(*args), start_worker(*args)]
    for w in workers:
        w.wait_listening()
    # Long enough that the job is still running when the kill lands (checked below).
    job = queue.enqueue("jobrunner.sleep", {"seconds": 5}, conn=conn)
    holder_id = wait_until(lambda: (j := queue.get(job.id, conn=conn)).state == "running"
                           and j.worker_id, what="the job to be claimed")
    [victim] = [w for w in workers if holder_id.startswith(w.id_prefix)]
    [survivor] = [w for w in workers if w is not victim]
    victim.signal(signal.SIGKILL)
    assert victim.wait(10) == -signal.SIGKILL
    killed_at = conn.execute("SELECT now()").fetchone()[0]
    held = queue.get(job.id, conn=conn)
    assert (held.state, held.attempts, held.worker_id) == ("running", 1, holder_id), \
        "the job was no longer held by the killed worker when it died"

    done = wait_until(lambda: (j := queue.get(job.id, conn=conn)).state in queue.FINAL_STATES
                      and j, timeout=30, what="the job to finish elsewhere")
    assert done.state == "succeeded" and done.attempts == 2
    assert done.worker_id.startswith(survivor.id_prefix)
    assert [e["error_type"] for e in done.errors] == ["LeaseExpired"]
    assert conn.execute("SELECT count(*) FROM results WHERE job_id = %s", (job.id,)).fetchone()[0] == 1
    # Taken over within lease + poll interval of the kill (both times are the database's),
    # plus generous slack for a busy machine.
    rerun_after = (done.started_at - killed_at).total_seconds()
    assert 0 < rerun_after <= lease + poll + 10.0, rerun_after
    survivor.signal(signal.SIGTERM)
    assert survivor.wait(30) == 0


def test_sigterm_drains_running_jobs_and_releases_the_rest_uncounted(conn, start_worker):
    worker = start_worker("--concurrency", "4", "--grace", "2", "--poll-interval", "0.5")
    worker.wait_listening()
    short = [queue.enqueue("jobrunner.sleep", {"seconds": 0.5}, conn=conn).id for _ in range(2)]
    long = [queue.enqueue("jobrunner.sleep", {"seconds": 60}, conn=conn).id for _ in range(2)]
    wait_until(lambda: count_jobs(conn, "running") == 4, what="four running jobs")
    worker.signal(signal.SIGTERM)
    assert worker.wait(30) == 0
    states = dict(conn.execute("SELECT id, state FROM jobs").fetchall())
    assert {states[i] for i in short} == {"succeeded"}   # finished within the grace period
    rows = conn.execute("SELECT state, attempts, worker_id, lease_expires_at FROM jobs "
                        "WHERE id = ANY(%s)", (long,)).fetchall()
    assert rows == [("queued", 0, None, None)] * 2
    assert "released" in worker.log()


def test_database_restart_while_processing_loses_and_repeats_nothing(pg_server, db_url, conn,
                                                                     start_worker):
    if pg_server.restart is None:
        pytest.skip("this server cannot be restarted by the tests (set DB_RESTART_CMD)")
    # 2,000 jobs of 0.05 s on 16 slots: at least 6 s of work, several times a restart.
    total = 2000
    queue.enqueue_many("jobrunner.sleep", [{"seconds": 0.05}] * total, conn=conn)
    args = ("--concurrency", "8", "--lease", "5", "--poll-interval", "0.5")
    workers = [start_worker(*args), start_worker(*args)]
    wait_until(lambda: count_jobs(conn, "succeeded") >= total // 10, timeout=60,
               what="a tenth of the jobs done")
    not_final = conn.execute("SELECT count(*) FROM jobs WHERE state IN ('queued', 'running')"
                             ).fetchone()[0]
    assert not_final >= total // 2, f"only {not_final} jobs left before the restart"
    conn.close()
    pg_server.restart()
    with psycopg.connect(db_url, autocommit=True) as fresh:
        wait_until(lambda: count_jobs(fresh, "succeeded") == total, timeout=90,
                   interval=0.2, what="all jobs to succeed after the restart")
        assert all(w.alive() for w in workers), [w.log() for w in workers]
        # The restart fell in the middle of the work: jobs finished on both sides of it.
        before, after = fresh.execute(
            "SELECT count(*) FILTER (WHERE finished_at < pg_postmaster_start_time()), "
            "count(*) FILTER (WHERE finished_at >= pg_postmaster_start_time()) FROM jobs"
        ).fetchone()
        assert before > 0 and after > 0, (before, after)
        assert fresh.execute("SELECT count(*), count(DISTINCT job_id) FROM results").fetchone() \
            == (total, total)
        assert fresh.execute("SELECT count(*) FROM jobs WHERE state <> 'succeeded'").fetchone()[0] == 0
        # the workers carry on with new work after the restart
        job = queue.enqueue("jobrunner.noop", conn=fresh)
        wait_until(lambda: queue.get(job.id, conn=fresh).state == "succeeded", timeout=30,
                   what="a new job after the restart")
    # Each worker saw the outage (its listening connection was cut) and came back; and at
    # least one claim, outcome write or heartbeat failed on a connection the restart broke.
    logs = [w.log() for w in workers]
    for log in logs:
        assert "listener: connection lost" in log and "listener: reconnected" in log, log
    failures = ("worker: claim failed", "worker: writing outcomes failed", "worker: heartbeat failed")
    assert any(f in log for f in failures for log in logs), logs
    for w in workers:
        w.signal(signal.SIGTERM)
    assert [w.wait(30) for w in workers] == [0, 0]
