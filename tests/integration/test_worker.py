"""The worker's behaviour, run in-process (threads) against a real Postgres.

Real worker processes are exercised in tests/e2e and tests/fault.
"""
from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta

import psycopg
import pytest

from jobrunner import errors, queue
from jobrunner.listener import Listener
from jobrunner.tasks import current_job, task
from jobrunner.worker import Worker, WorkerConfig, parse_duration
from tests.workers import wait_until


# Tasks only these tests use (registered in this process, where the worker runs).
@task("tests.slow_uncooperative", timeout=0.3, max_attempts=1)
def _slow_uncooperative(seconds: float = 3.0) -> str:
    time.sleep(seconds)
    return "too late"


@task("tests.not_json")
def _not_json() -> object:
    return object()


@task("tests.value_check")
def _value_check(n: int) -> int:
    if not isinstance(n, int):
        raise errors.PermanentFailure("n must be an integer")
    return n * 2


@task("tests.record_order")
def _record_order(tag: str) -> dict:
    return {"tag": tag, "attempt": current_job().attempt}


@task("tests.nul_error", max_attempts=1)
def _nul_error() -> None:
    raise RuntimeError("bad \x00 byte" + "x" * 10_000)


# retry_in of 1e308 s is beyond PostgreSQL's interval range: the database refuses the outcome.
@task("tests.unwritable_retry", max_attempts=2, backoff=(1e308, 1e308))
def _unwritable_retry() -> None:
    raise RuntimeError("retry me in a geological age")


@pytest.fixture
def run_worker(db_url):
    workers: list[tuple[Worker, threading.Thread]] = []

    def start(**overrides) -> Worker:
        cfg = WorkerConfig(**{"poll_interval": 0.2, "concurrency": 4, "grace": 2.0, **overrides})
        worker = Worker(db_url, cfg)
        thread = threading.Thread(target=worker.run, daemon=True)
        thread.start()
        assert worker.started.wait(10)
        workers.append((worker, thread))
        return worker

    yield start
    for worker, thread in workers:
        worker.stop()
        thread.join(30)
        assert not thread.is_alive()


def final(conn, job_id, timeout=30.0) -> queue.Job:
    return wait_until(lambda: (j := queue.get(job_id, conn=conn)).state in queue.FINAL_STATES and j,
                      timeout, what=f"job {job_id} to finish")


def test_runs_jobs_and_stores_results(conn, run_worker):
    run_worker()
    job = queue.enqueue("tests.value_check", {"n": 21}, conn=conn)
    done = final(conn, job.id)
    assert done.state == "succeeded" and done.result == 42 and done.attempts == 1
    assert conn.execute("SELECT result, attempts FROM results WHERE job_id = %s",
                        (job.id,)).fetchall() == [(42, 1)]


def test_failing_task_retries_with_backoff_then_dies(conn, run_worker):
    run_worker()
    job = queue.enqueue("jobrunner.fail", {"message": "nope"}, max_attempts=3, conn=conn)
    dead = final(conn, job.id)
    assert dead.state == "dead" and dead.attempts == 3 and dead.last_error == "nope"
    assert [e["attempt"] for e in dead.errors] == [1, 2, 3]
    assert all(e["error_type"] == "RuntimeError" and "Traceback" in e["traceback"]
               for e in dead.errors)
    # jobrunner.fail backs off 0.2 s * 2**(attempt-1), +-20% jitter
    at = [datetime.fromisoformat(e["at"]) for e in dead.errors]
    retry_at = [e["retry_at"] and datetime.fromisoformat(e["retry_at"]) for e in dead.errors]
    for i, raw in enumerate([0.2, 0.4]):
        delay = (retry_at[i] - at[i]).total_seconds()
        assert raw * 0.8 - 1e-3 <= delay <= raw * 1.2 + 1e-3
        assert at[i + 1] >= retry_at[i]          # the next attempt did not start early
    assert retry_at[2] is None
    assert conn.execute("SELECT count(*) FROM results").fetchone()[0] == 0


def test_unknown_task_and_rejected_args_are_dead_at_once(conn, run_worker):
    run_worker()
    unknown = queue.enqueue("no.such.task", conn=conn)
    bad_args = queue.enqueue("jobrunner.sleep", {"secs": 1}, conn=conn)
    bad_value = queue.enqueue("tests.value_check", {"n": "x"}, conn=conn)
    for job_id, needle in [(unknown.id, "unknown task 'no.such.task'"),
                           (bad_args.id, "rejected its args"),
                           (bad_value.id, "n must be an integer")]:
        dead = final(conn, job_id)
        assert dead.state == "dead" and dead.attempts == 1, dead
        assert needle in dead.last_error
        assert len(dead.errors) == 1


def test_result_that_is_not_json_is_a_permanent_failure(conn, run_worker):
    run_worker()
    dead = final(conn, queue.enqueue("tests.not_json", conn=conn).id)
    assert dead.state == "dead" and dead.errors[0]["error_type"] == "ResultNotSerialisable"


def test_timeout_counts_as_failed_attempt_and_late_result_is_discarded(conn, run_worker):
    worker = run_worker(concurrency=1)
    slow = queue.enqueue("tests.slow_uncooperative", {"seconds": 1.5}, conn=conn)
    dead = final(conn, slow.id)
    assert dead.state == "dead" and dead.errors[0]["error_type"] == "TaskTimeout"
    # the slot was replaced: another job runs while the overrunning task still sleeps
    quick = queue.enqueue("jobrunner.noop", conn=conn)
    assert final(conn, quick.id).state == "succeeded"
    time.sleep(1.6)  # the abandoned task returns now; its result must not be written
    assert queue.get(slow.id, conn=conn).state == "dead"
    assert conn.execute("SELECT count(*) FROM results WHERE job_id = %s",
                        (slow.id,)).fetchone()[0] == 0
    assert worker.stats["timeouts"] == 1


def test_cancel_running_job_is_cooperative(conn, run_worker):
    run_worker()
    job = queue.enqueue("jobrunner.sleep", {"seconds": 60}, conn=conn)
    wait_until(lambda: queue.get(job.id, conn=conn).state == "running", what="running")
    assert queue.cancel(job.id, conn=conn).cancel_requested
    done = final(conn, job.id, timeout=10)
    assert done.state == "cancelled" and done.finished_at


def test_rolled_back_enqueue_never_runs(db_url, conn, run_worker):
    run_worker()
    with psycopg.connect(db_url) as tx:
        ghost = queue.enqueue("tests.record_order", {"tag": "ghost"}, conn=tx)
        tx.rollback()
    marker = queue.enqueue("tests.record_order", {"tag": "marker"}, conn=conn)
    assert final(conn, marker.id).state == "succeeded"
    time.sleep(0.5)  # a few more polls
    assert conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 1
    with pytest.raises(errors.JobNotFound):
        queue.get(ghost.id, conn=conn)


def test_future_run_at_is_not_run_early(conn, run_worker):
    run_worker()
    job = queue.enqueue("jobrunner.noop", delay=1.0, conn=conn)
    done = final(conn, job.id)
    assert done.state == "succeeded" and done.started_at >= done.run_at


def test_higher_priority_runs_first(conn, run_worker):
    ids = {}
    for tag, priority in [("low", 10), ("mid", 0), ("high", -10), ("mid2", 0)]:
        ids[tag] = queue.enqueue("tests.record_order", {"tag": tag}, priority=priority, conn=conn).id
    run_worker(concurrency=1)
    for job_id in ids.values():
        final(conn, job_id)
    order = [row[0] for row in conn.execute(
        "SELECT args->>'tag' FROM jobs ORDER BY started_at, id")]
    assert order == ["high", "mid", "mid2", "low"]


def test_notify_wakes_an_idle_worker_before_the_poll_interval(conn, run_worker):
    worker = run_worker(poll_interval=30.0)
    assert worker._listener.wait_connected(10)
    time.sleep(0.3)  # idle: the first poll is over
    job = queue.enqueue("jobrunner.noop", conn=conn)
    done = final(conn, job.id, timeout=10)   # far less than the 30 s poll interval
    assert done.state == "succeeded"


def test_sigterm_style_stop_releases_unfinished_jobs_uncounted(conn, db_url):
    worker = Worker(db_url, WorkerConfig(concurrency=2, poll_interval=0.2, grace=0.5))
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    long = [queue.enqueue("jobrunner.sleep", {"seconds": 30}, conn=conn).id for _ in range(2)]
    waiting = queue.enqueue("jobrunner.sleep", {"seconds": 30}, conn=conn).id
    wait_until(lambda: conn.execute("SELECT count(*) FROM jobs WHERE state = 'running'")
               .fetchone()[0] == 2, what="two running")
    worker.stop()
    thread.join(20)
    assert not thread.is_alive()
    rows = conn.execute("SELECT id, state, attempts, worker_id FROM jobs ORDER BY id").fetchall()
    assert rows == [(i, "queued", 0, None) for i in sorted(long + [waiting])]
    assert worker.stats["released"] == 2


def test_worker_survives_its_connections_being_killed(conn, run_worker):
    run_worker(concurrency=2)
    first = queue.enqueue("jobrunner.noop", conn=conn)
    final(conn, first.id)
    killed = conn.execute(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid()").fetchone()[0]
    assert killed >= 2
    ids = queue.enqueue_many("jobrunner.noop", [{}] * 50, conn=conn)
    wait_until(lambda: conn.execute("SELECT count(*) FROM jobs WHERE state = 'succeeded'")
               .fetchone()[0] == 51, timeout=30, what="all succeeded")
    assert conn.execute("SELECT count(*) FROM results WHERE job_id = ANY(%s)",
                        (ids,)).fetchone()[0] == 50


def test_listener_reconnects_and_calls_on_reconnect(db_url, conn):
    got, reconnected = [], threading.Event()
    listener = Listener(db_url, ["chan_a"], lambda n: got.append(n.payload),
                        on_reconnect=reconnected.set, backoff=(0.05, 0.5)).start()
    try:
        assert listener.wait_connected(10)
        conn.execute("SELECT pg_notify('chan_a', 'one')")
        wait_until(lambda: got == ["one"], 5, what="first notification")
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                     "WHERE datname = current_database() AND pid <> pg_backend_pid()")
        assert reconnected.wait(10)
        assert listener.wait_connected(10)
        conn.execute("SELECT pg_notify('chan_a', 'two')")
        wait_until(lambda: got == ["one", "two"], 5, what="notification after reconnect")
    finally:
        listener.stop()


def test_report_payments_task_stores_the_aggregate(conn, run_worker):
    conn.execute("INSERT INTO orders (user_id, total) VALUES (2, 5), (1, 7), (2, 10)")
    run_worker()
    done = final(conn, queue.enqueue("report.payments", conn=conn).id)
    assert done.state == "succeeded", done.errors
    assert done.result == {"data": [{"user_id": 1, "total_payment": 7},
                                    {"user_id": 2, "total_payment": 15}]}


def test_parse_duration():
    assert parse_duration("7d") == 7 * 86400
    assert parse_duration("90m") == 5400
    assert parse_duration("1.5") == 1.5
    for bad in ("", "x", "-1s", "7y"):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_worker_prunes_old_finished_jobs_when_configured(conn, run_worker):
    ids = queue.enqueue_many("jobrunner.noop", [{}] * 5, conn=conn)
    conn.execute("UPDATE jobs SET state = 'succeeded', finished_at = now() - interval '3 days' "
                 "WHERE id = ANY(%s)", (ids[:3],))
    run_worker(prune_older_than=86400.0, lease=0.9)  # heartbeat (and first prune) at 0.3 s
    wait_until(lambda: conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 2,
               timeout=20, what="the old jobs to be pruned")
    assert {r[0] for r in conn.execute("SELECT id FROM jobs")} == set(ids[3:])


def test_worker_waits_for_migrations_and_then_works(new_database, caplog):
    from jobrunner.migrate import migrate

    url = new_database(migrated=False)
    worker = Worker(url, WorkerConfig(poll_interval=0.2, concurrency=2, grace=1.0))
    thread = threading.Thread(target=worker.run, daemon=True)
    with caplog.at_level("WARNING", logger="jobrunner.worker"):
        thread.start()
        try:
            wait_until(lambda: "not migrated" in caplog.text, timeout=20, what="the hint")
            migrate(url)
            with psycopg.connect(url, autocommit=True) as c:
                job = queue.enqueue("jobrunner.noop", conn=c)
                assert final(c, job.id).state == "succeeded"
        finally:
            worker.stop()
            thread.join(30)
    assert not thread.is_alive()


def test_heartbeats_keep_a_long_job_from_being_taken_over(conn, run_worker):
    # lease 1.5 s, heartbeat every 0.5 s; the job runs two leases long next to an idle worker
    run_worker(lease=1.5, poll_interval=0.1)
    job = queue.enqueue("jobrunner.sleep", {"seconds": 3.2}, conn=conn)
    wait_until(lambda: queue.get(job.id, conn=conn).state == "running", what="running")
    run_worker(lease=1.5, poll_interval=0.1)   # would take it over if the lease lapsed
    done = final(conn, job.id)
    assert done.state == "succeeded" and done.attempts == 1 and done.errors == []
    assert done.heartbeat_at > done.started_at      # heartbeats extended the lease


def test_error_text_with_nul_is_stored_cleaned_and_the_batch_completes(conn, run_worker):
    with conn.transaction():   # one transaction: claimed together, finished in one batch
        bad = queue.enqueue("tests.nul_error", conn=conn)
        good = queue.enqueue("tests.value_check", {"n": 2}, conn=conn)
    run_worker()
    dead = final(conn, bad.id)
    assert dead.state == "dead" and dead.attempts == 1
    assert "\x00" not in dead.last_error
    assert dead.last_error.startswith("bad \ufffd byte")
    assert len(dead.last_error) <= queue.MESSAGE_MAX
    error = dead.errors[0]
    assert error["error_type"] == "RuntimeError" and error["message"] == dead.last_error
    assert "\x00" not in error["traceback"] and len(error["traceback"]) <= queue.TRACEBACK_MAX
    assert final(conn, good.id).state == "succeeded"


def test_outcome_the_database_refuses_is_dropped_and_the_lease_rescues_the_job(conn, run_worker):
    worker = run_worker(lease=1.0, poll_interval=0.1)
    job = queue.enqueue("tests.unwritable_retry", conn=conn)
    # Attempt 1's outcome cannot be written: the worker stops heartbeating the job, its lease
    # expires, and attempt 2 (the last, so no retry delay) is written: dead.
    dead = final(conn, job.id)
    assert dead.state == "dead" and dead.attempts == 2, dead
    assert worker.stats["write_failed"] == 1
    wait_until(lambda: not worker._held, what="nothing held")


def test_slow_jobs_claimed_with_a_big_inline_batch_are_given_back_to_other_workers(conn, run_worker):
    with conn.transaction():
        noops = queue.enqueue_many("jobrunner.noop", [{}] * 50, conn=conn)
        sleeps = queue.enqueue_many("jobrunner.sleep", [{"seconds": 0.3}] * 20, conn=conn)
    # A's first claims are all no-ops (inline), so it claims a big batch holding the sleeps.
    first = run_worker(concurrency=2, poll_interval=0.1)
    wait_until(lambda: conn.execute("SELECT count(*) FROM jobs WHERE id = ANY(%s) AND state = "
                                    "'succeeded'", (noops,)).fetchone()[0] == 50, what="no-ops")
    # Only the sleeps A has a slot for stay with it; the others are queued for B.
    second = run_worker(concurrency=2, poll_interval=0.1)
    for job_id in sleeps:
        assert final(conn, job_id).state == "succeeded"
    rows = conn.execute("SELECT worker_id, attempts, errors FROM jobs WHERE id = ANY(%s)",
                        (sleeps,)).fetchall()
    assert all(attempts == 1 and errors == [] for _, attempts, errors in rows)
    by_worker = {w: sum(1 for r in rows if r[0] == w) for w in (first.worker_id, second.worker_id)}
    assert by_worker[second.worker_id] > 0 and sum(by_worker.values()) == 20, by_worker
    assert first.stats["surplus_released"] > 0


def test_report_payments_cancelled_while_aggregating_discards_its_result(conn, db_url, run_worker):
    conn.execute("INSERT INTO orders (user_id, total) VALUES (1, 7)")
    with psycopg.connect(db_url) as locker:
        locker.execute("LOCK TABLE orders IN ACCESS EXCLUSIVE MODE")  # the aggregation waits
        worker = run_worker()
        job = queue.enqueue("report.payments", conn=conn)
        wait_until(lambda: job.id in worker._running, what="the report to start")
        queue.cancel(job.id, conn=conn)
        wait_until(lambda: worker._running[job.id].ctx.cancel_requested(), what="cancel seen")
    # the lock is gone: the aggregation returns, but the job was cancelled meanwhile
    done = final(conn, job.id)
    assert done.state == "cancelled" and done.result is None
    assert conn.execute("SELECT count(*) FROM results").fetchone()[0] == 0
