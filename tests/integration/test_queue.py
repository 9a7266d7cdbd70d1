"""The queue's SQL and Python API against a real Postgres (no worker process)."""
from __future__ import annotations

import json
import time
from datetime import datetime, timedelta, timezone

import psycopg
import pytest

from jobrunner import errors, queue


def claim(conn, worker="w1", limit=10, lease=30.0, q="default"):
    return queue.claim(conn, queue=q, limit=limit, worker_id=worker, lease=lease)


def test_enqueue_defaults_and_get(conn):
    job = queue.enqueue("jobrunner.noop", {"a": 1}, conn=conn)
    assert job.state == "queued" and job.queue == "default" and job.args == {"a": 1}
    assert job.attempts == 0 and job.max_attempts == 5 and job.errors == []
    got = queue.get(job.id, conn=conn)
    assert got.id == job.id and got.result is None and got.kind == "jobrunner.noop"


def test_registered_task_max_attempts_is_the_default(conn):
    assert queue.enqueue("report.payments", conn=conn).max_attempts == 3
    assert queue.enqueue("report.payments", max_attempts=7, conn=conn).max_attempts == 7


def test_get_unknown_job_raises(conn):
    with pytest.raises(errors.JobNotFound):
        queue.get(999_999, conn=conn)


@pytest.mark.parametrize("kwargs", [
    {"kind": ""}, {"kind": 5}, {"queue": ""}, {"priority": "high"}, {"priority": True},
    {"max_attempts": 0}, {"delay": "soon"}, {"run_at": datetime(2030, 1, 1)},
    {"args": {"x": object()}}, {"delay": 1, "run_at": datetime.now(timezone.utc)},
    # values PostgreSQL would refuse (DataError) are refused before they reach it
    {"kind": "a\x00b"}, {"queue": "\x00"}, {"queue": "a\nb"}, {"dedupe_key": "k\x00"},
    {"args": [float("nan")]}, {"args": {"x": float("inf")}}, {"args": {"a": "\x00"}},
    {"args": {"\x00": 1}}, {"args": [["deep \x00"]]}, {"delay": 1e300},
    {"delay": float("inf")}, {"delay": float("nan")}, {"delay": 10**400},
    {"delay": timedelta(days=999_999_999)},
])
def test_enqueue_rejects_bad_input(conn, kwargs):
    params = {"kind": "jobrunner.noop", **kwargs}
    kind = params.pop("kind")
    with pytest.raises(errors.InvalidInput):
        queue.enqueue(kind, conn=conn, **params)
    if set(params) <= {"args", "delay", "queue"}:
        many = {k: v for k, v in params.items() if k != "args"}
        with pytest.raises(errors.InvalidInput):
            queue.enqueue_many(kind, [{}, params.get("args")], conn=conn, **many)
    assert conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 0


def test_args_with_an_escaped_backslash_u0000_text_are_fine(conn):
    job = queue.enqueue("jobrunner.noop", {"a": "\\u0000"}, conn=conn)
    assert queue.get(job.id, conn=conn).args == {"a": "\\u0000"}


@pytest.mark.parametrize("argv", [
    ["enqueue", "jobrunner.noop", "--args", "[NaN]"],
    ["enqueue", "jobrunner.noop", "--args", '{"a": "\\u0000"}'],
    ["enqueue", "jobrunner.noop", "--args", '{"a": "\\u0000"}', "--count", "2"],
    ["enqueue", "jobrunner.noop", "--count", "99999999999999999999"],
    ["enqueue", "jobrunner.noop", "--delay", "1e300"],
    ["enqueue", "jobrunner.noop", "--priority", "99999999999"],
    ["enqueue", "jobrunner.noop", "--queue", "a\x01b"],
    ["prune", "--older-than", "99999999999999d"],
    ["prune", "--older-than", "1e400d"],
])
def test_cli_bad_input_exits_2_with_one_line(db_url, conn, monkeypatch, capsys, argv):
    from jobrunner import cli

    monkeypatch.setenv("DATABASE_URL", db_url)
    try:
        status = cli.main(argv)
    except SystemExit as exc:    # argparse rejects it
        status = exc.code
    assert status == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error:" in err.splitlines()[-1]
    assert conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 0


def test_enqueue_joins_the_callers_transaction(db_url):
    with psycopg.connect(db_url) as conn:
        job = queue.enqueue("jobrunner.noop", conn=conn)
        conn.rollback()
        with pytest.raises(errors.JobNotFound):
            queue.get(job.id, conn=conn)
        kept = queue.enqueue("jobrunner.noop", conn=conn)
        conn.commit()
    with psycopg.connect(db_url) as other:
        assert queue.get(kept.id, conn=other).state == "queued"


def test_enqueue_notifies_once_per_queue_per_transaction_and_only_on_commit(db_url):
    with psycopg.connect(db_url, autocommit=True) as listener, psycopg.connect(db_url) as conn:
        listener.execute("LISTEN jobrunner_jobs")
        for _ in range(3):
            queue.enqueue("jobrunner.noop", conn=conn)
        queue.enqueue("jobrunner.noop", queue="other", conn=conn)
        queue.enqueue("jobrunner.noop", queue="later", delay=60, conn=conn)  # not runnable yet
        conn.commit()
        got = [n.payload for n in listener.notifies(timeout=1.0)]
        assert sorted(got) == ["default", "other"]
        queue.enqueue("jobrunner.noop", conn=conn)
        conn.rollback()
        assert [n.payload for n in listener.notifies(timeout=0.3)] == []


def test_dedupe_key_returns_the_active_job(conn):
    first = queue.enqueue("jobrunner.noop", dedupe_key="k1", conn=conn)
    again = queue.enqueue("jobrunner.noop", dedupe_key="k1", conn=conn)
    assert again.id == first.id
    # once finished, the key is free again
    [c] = claim(conn)
    queue.complete(conn, "w1", [(c.id, c.attempts, None)])
    third = queue.enqueue("jobrunner.noop", dedupe_key="k1", conn=conn)
    assert third.id != first.id


def test_enqueue_many_bulk(conn):
    ids = queue.enqueue_many("jobrunner.noop", ({"i": i} for i in range(100_000)), conn=conn)
    assert len(ids) == 100_000 and ids == sorted(ids)
    count, lo, hi = conn.execute(
        "SELECT count(*), min((args->>'i')::int), max((args->>'i')::int) FROM jobs "
        "WHERE state = 'queued'").fetchone()
    assert (count, lo, hi) == (100_000, 0, 99_999)
    # ids follow the order of args
    assert conn.execute("SELECT (args->>'i')::int FROM jobs WHERE id = %s",
                        (ids[123],)).fetchone()[0] == 123
    assert queue.enqueue_many("jobrunner.noop", [], conn=conn) == []


def test_claim_orders_by_priority_then_run_at_and_batches(conn):
    low = queue.enqueue("jobrunner.noop", priority=5, conn=conn)
    high = queue.enqueue("jobrunner.noop", priority=-5, conn=conn)
    mid = queue.enqueue("jobrunner.noop", priority=0, conn=conn)
    future = queue.enqueue("jobrunner.noop", priority=-100, delay=3600, conn=conn)
    other = queue.enqueue("jobrunner.noop", queue="other", conn=conn)
    got = claim(conn, limit=2)
    assert [c.id for c in got] == [high.id, mid.id]
    assert all(c.attempts == 1 for c in got)
    assert [c.id for c in claim(conn, limit=10)] == [low.id]
    assert claim(conn, limit=10) == []           # the future job is not due
    assert [c.id for c in claim(conn, q="other")] == [other.id]
    row = queue.get(high.id, conn=conn)
    assert row.state == "running" and row.worker_id == "w1" and row.lease_expires_at
    assert queue.get(future.id, conn=conn).state == "queued"


def test_concurrent_claims_never_share_a_job(db_url, conn):
    queue.enqueue_many("jobrunner.noop", [{}] * 200, conn=conn)
    with psycopg.connect(db_url, autocommit=True) as a, psycopg.connect(db_url, autocommit=True) as b:
        a.execute("BEGIN")
        first = claim(a, "wa", limit=150)  # rows stay locked until commit
        second = claim(b, "wb", limit=150)  # skips the locked ones
        a.execute("COMMIT")
    ids_a, ids_b = {c.id for c in first}, {c.id for c in second}
    assert len(ids_a) == 150 and len(ids_b) == 50 and not ids_a & ids_b


def test_complete_writes_result_once_and_guards_the_token(conn):
    job = queue.enqueue("jobrunner.noop", conn=conn)
    [c] = claim(conn)
    assert queue.complete(conn, "someone-else", [(c.id, c.attempts, {"x": 1})]) == set()
    assert queue.complete(conn, "w1", [(c.id, c.attempts + 1, {"x": 1})]) == set()
    assert queue.complete(conn, "w1", [(c.id, c.attempts, {"x": 1})]) == {c.id}
    assert queue.complete(conn, "w1", [(c.id, c.attempts, {"x": 2})]) == set()  # late repeat
    done = queue.get(job.id, conn=conn)
    assert done.state == "succeeded" and done.result == {"x": 1} and done.finished_at
    rows = conn.execute("SELECT result, attempts FROM results WHERE job_id = %s", (job.id,)).fetchall()
    assert rows == [({"x": 1}, 1)]


def test_completion_notifies_id_and_state(db_url, conn):
    job = queue.enqueue("jobrunner.noop", conn=conn)
    [c] = claim(conn)
    with psycopg.connect(db_url, autocommit=True) as listener:
        listener.execute("LISTEN jobrunner_done")
        queue.complete(conn, "w1", [(c.id, c.attempts, None)])
        [note] = list(listener.notifies(timeout=1.0, stop_after=1))
    assert json.loads(note.payload) == {"id": job.id, "state": "succeeded"}


def test_expired_lease_is_claimed_again_with_the_lost_attempt_recorded(conn):
    job = queue.enqueue("jobrunner.noop", conn=conn)
    [first] = claim(conn, "dead-worker", lease=0.2)
    assert claim(conn, "w2") == []               # lease still valid
    time.sleep(0.4)
    [again] = claim(conn, "w2")
    assert again.id == job.id and again.attempts == 2
    # the dead worker's late completion is refused; the live one's is accepted
    assert queue.complete(conn, "dead-worker", [(first.id, first.attempts, "late")]) == set()
    assert queue.complete(conn, "w2", [(again.id, again.attempts, "ok")]) == {job.id}
    done = queue.get(job.id, conn=conn)
    assert done.result == "ok" and done.attempts == 2
    assert [e["error_type"] for e in done.errors] == ["LeaseExpired"]
    assert done.errors[0]["worker"] == "dead-worker" and done.errors[0]["attempt"] == 1


def test_expired_lease_on_the_last_attempt_is_reaped_dead(conn):
    job = queue.enqueue("jobrunner.noop", max_attempts=1, conn=conn)
    claim(conn, "dead-worker", lease=0.1)
    time.sleep(0.3)
    assert claim(conn, "w2") == []
    assert queue.reap_expired(conn) == {job.id: "dead"}
    dead = queue.get(job.id, conn=conn)
    assert dead.state == "dead" and dead.errors[0]["error_type"] == "LeaseExpired"


def test_heartbeat_extends_the_lease_and_reports_cancel(conn):
    job = queue.enqueue("jobrunner.sleep", conn=conn)
    [c] = claim(conn, lease=0.3)
    before = queue.get(job.id, conn=conn).lease_expires_at
    assert queue.heartbeat(conn, "w1", [(c.id, c.attempts)], lease=60) == {job.id: False}
    assert queue.get(job.id, conn=conn).lease_expires_at > before + timedelta(seconds=30)
    queue.cancel(job.id, conn=conn)
    assert queue.heartbeat(conn, "w1", [(c.id, c.attempts)], lease=60) == {job.id: True}
    assert queue.heartbeat(conn, "w2", [(c.id, c.attempts)], lease=60) == {}


def test_fail_retries_with_backoff_then_dead(conn):
    job = queue.enqueue("jobrunner.fail", max_attempts=2, conn=conn)
    [c] = claim(conn)
    states = queue.fail(conn, "w1", [queue.Failure(c.id, c.attempts, "RuntimeError", "boom",
                                                   "tb", retry_in=0.3)])
    assert states == {job.id: "failed"}
    row = queue.get(job.id, conn=conn)
    assert row.state == "failed" and row.last_error == "boom" and row.finished_at is None
    assert claim(conn) == []                     # not before its retry time
    time.sleep(0.4)
    [c2] = claim(conn)
    assert c2.attempts == 2
    assert queue.fail(conn, "w1", [queue.Failure(c2.id, 2, "RuntimeError", "boom again",
                                                 retry_in=0.3)]) == {job.id: "dead"}
    dead = queue.get(job.id, conn=conn)
    assert dead.state == "dead" and dead.finished_at
    assert [(e["attempt"], e["message"]) for e in dead.errors] == [(1, "boom"), (2, "boom again")]
    assert dead.errors[0]["retry_at"] is not None and dead.errors[1]["retry_at"] is None
    assert dead.errors[0]["traceback"] == "tb" and dead.errors[0]["worker"] == "w1"


def test_permanent_failure_is_dead_at_once(conn):
    job = queue.enqueue("no.such.task", conn=conn)
    [c] = claim(conn)
    assert queue.fail(conn, "w1", [queue.Failure(c.id, 1, "PermanentFailure", "unknown task",
                                                 permanent=True)]) == {job.id: "dead"}
    assert queue.get(job.id, conn=conn).attempts == 1


def test_cancel_queued_and_running(db_url, conn):
    queued = queue.enqueue("jobrunner.sleep", conn=conn)
    assert queue.cancel(queued.id, conn=conn).state == "cancelled"
    running = queue.enqueue("jobrunner.sleep", conn=conn)
    [c] = claim(conn)
    with psycopg.connect(db_url, autocommit=True) as listener:
        listener.execute("LISTEN jobrunner_cancel")
        job = queue.cancel(running.id, conn=conn)
        [note] = list(listener.notifies(timeout=1.0, stop_after=1))
    assert note.payload == str(running.id)
    assert job.state == "running" and job.cancel_requested
    # a failure after a cancel request ends cancelled, not retried
    assert queue.fail(conn, "w1", [queue.Failure(c.id, 1, "JobCancelled", "stopped",
                                                 retry_in=1)]) == {running.id: "cancelled"}
    # finished jobs are left alone
    assert queue.cancel(running.id, conn=conn).state == "cancelled"
    with pytest.raises(errors.JobNotFound):
        queue.cancel(123_456, conn=conn)


def test_release_requeues_without_counting_the_attempt(conn):
    job = queue.enqueue("jobrunner.sleep", conn=conn)
    [c] = claim(conn)
    assert queue.release(conn, "w1", [(c.id, c.attempts)]) == {job.id: "queued"}
    row = queue.get(job.id, conn=conn)
    assert row.state == "queued" and row.attempts == 0 and row.worker_id is None
    [again] = claim(conn)
    assert again.attempts == 1


def test_finish_batches_outcomes_in_one_transaction(conn):
    a, b, c, d = (queue.enqueue("jobrunner.noop", conn=conn) for _ in range(4))
    claimed = {x.id: x for x in claim(conn)}
    out = queue.finish(
        conn, "w1",
        succeeded=[(a.id, 1, 1)],
        failed=[queue.Failure(b.id, 1, "E", "m", retry_in=5)],
        cancelled=[(c.id, 1)],
        released=[(d.id, 1)],
    )
    assert len(claimed) == 4
    assert out.succeeded == {a.id} and out.failed == {b.id: "failed"}
    assert out.cancelled == {c.id} and out.released == {d.id: "queued"}


def test_prune_deletes_old_finished_jobs_and_their_results(conn):
    ids = queue.enqueue_many("jobrunner.noop", [{}] * 30, conn=conn)
    keep = queue.enqueue("jobrunner.noop", delay=3600, conn=conn)
    claimed = claim(conn, limit=30)
    queue.complete(conn, "w1", [(c.id, c.attempts, None) for c in claimed])
    conn.execute("UPDATE jobs SET finished_at = now() - interval '8 days' WHERE id = ANY(%s)",
                 (ids[:20],))
    assert queue.prune(timedelta(days=7), batch_size=7, conn=conn) == 20
    left = conn.execute("SELECT count(*) FROM jobs").fetchone()[0]
    assert left == 11
    assert conn.execute("SELECT count(*) FROM results").fetchone()[0] == 10
    assert queue.get(keep.id, conn=conn).state == "queued"
    with pytest.raises(errors.InvalidInput):
        queue.prune(-1, conn=conn)


def test_calls_without_conn_use_the_default_pool(db_url, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", db_url)
    queue.close_default_pool()
    try:
        job = queue.enqueue("jobrunner.noop", {"n": 1})
        assert queue.get(job.id).args == {"n": 1}
        assert queue.cancel(job.id).state == "cancelled"
    finally:
        queue.close_default_pool()
