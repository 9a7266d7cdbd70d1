"""The failed-jobs SQL surface (sql/004_failed_jobs.sql) and jobrunner.admin, on a real
database: views, the repair functions, their notifications, and a retry racing claims."""
from __future__ import annotations

import json
import threading

import psycopg
import psycopg.errors
import pytest
from psycopg.rows import dict_row
from psycopg.sql import SQL, Identifier

from jobrunner import admin, errors, queue


def claim(conn, worker="w1", queue_name="default", limit=1):
    return queue.claim(conn, queue=queue_name, limit=limit, worker_id=worker, lease=30)


def fail(conn, job_id, attempts, worker="w1", permanent=False):
    return queue.fail(conn, worker, [queue.Failure(job_id, attempts, "RuntimeError",
                                                   f"boom {attempts}", "Traceback ...",
                                                   permanent=permanent, retry_in=0)])


def row(conn, sql, params=()):
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(sql, params).fetchone()


def rows(conn, sql, params=()):
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(sql, params).fetchall()


def notifications(url, channel):
    """A listening connection; call .drain() for what arrived."""
    listener = psycopg.connect(url, autocommit=True)
    listener.execute(SQL("LISTEN {}").format(Identifier(channel)))

    def drain():
        return [n.payload for n in listener.notifies(timeout=0.5)]
    listener.drain = drain
    return listener


def test_fail_job_shows_in_failed_jobs_then_dead_jobs_and_sql_retry_runs_it_again(db_url, conn):
    job = queue.enqueue("jobrunner.fail", {"message": "nope"}, max_attempts=3, conn=conn)
    assert row(conn, "SELECT * FROM failed_jobs WHERE id = %s", (job.id,)) is None
    for attempt in (1, 2):
        [c] = claim(conn)
        assert c.attempts == attempt
        assert fail(conn, job.id, attempt) == {job.id: "failed"}
        seen = row(conn, "SELECT * FROM failed_jobs WHERE id = %s", (job.id,))
        assert seen["state"] == "failed" and seen["attempts"] == attempt
        assert seen["max_attempts"] == 3 and seen["errors_count"] == attempt
        assert seen["last_error"] == f"boom {attempt}" and seen["next_run_at"] is not None
        assert row(conn, "SELECT * FROM dead_jobs WHERE id = %s", (job.id,)) is None
    [c] = claim(conn)
    # running again after failures: still listed (it has not succeeded)
    assert row(conn, "SELECT state FROM failed_jobs WHERE id = %s", (job.id,))["state"] == "running"
    assert fail(conn, job.id, 3) == {job.id: "dead"}
    dead = row(conn, "SELECT * FROM dead_jobs WHERE id = %s", (job.id,))
    assert dead["attempts"] == 3 and dead["errors_count"] == 3
    assert [e["attempt"] for e in dead["errors"]] == [1, 2, 3]
    assert row(conn, "SELECT state, next_run_at FROM failed_jobs WHERE id = %s", (job.id,)) == \
        {"state": "dead", "next_run_at": None}

    listener = notifications(db_url, "jobrunner_jobs")
    try:
        retried = row(conn, "SELECT * FROM jobrunner_retry(%s)", (job.id,))
        assert listener.drain() == ["default"]
    finally:
        listener.close()
    # queued now, attempts and history kept, one more attempt granted
    assert retried["state"] == "queued" and retried["attempts"] == 3
    assert retried["max_attempts"] == 4 and len(retried["errors"]) == 3
    assert retried["finished_at"] is None and retried["worker_id"] is None
    assert row(conn, "SELECT * FROM dead_jobs WHERE id = %s", (job.id,)) is None
    [c] = claim(conn)
    assert (c.id, c.attempts) == (job.id, 4)
    assert fail(conn, job.id, 4) == {job.id: "dead"}   # the granted attempt was the last
    assert len(queue.get(job.id, conn=conn).errors) == 4


def test_retry_keeps_a_failed_jobs_budget_and_runs_it_now(conn):
    job = queue.enqueue("jobrunner.fail", max_attempts=5, conn=conn)
    claim(conn)
    queue.fail(conn, "w1", [queue.Failure(job.id, 1, "E", "m", retry_in=3600)])
    assert queue.get(job.id, conn=conn).state == "failed"
    assert claim(conn) == []                      # waiting an hour for its retry
    retried = admin.retry(job.id, conn=conn)
    assert (retried.state, retried.attempts, retried.max_attempts) == ("queued", 1, 5)
    [c] = claim(conn)
    assert (c.id, c.attempts) == (job.id, 2)


def test_retry_refuses_other_states_and_unknown_ids(conn):
    queued = queue.enqueue("jobrunner.noop", conn=conn)
    with pytest.raises(errors.Conflict, match="queued"):
        admin.retry(queued.id, conn=conn)
    claim(conn)
    with pytest.raises(errors.Conflict, match="running"):
        admin.retry(queued.id, conn=conn)
    assert queue.get(queued.id, conn=conn).state == "running"   # not taken from its worker
    queue.complete(conn, "w1", [(queued.id, 1, {"ok": True})])
    with pytest.raises(errors.Conflict, match="succeeded"):
        admin.retry(queued.id, conn=conn)
    with pytest.raises(errors.JobNotFound):
        admin.retry(987_654, conn=conn)
    with pytest.raises(errors.JobNotFound):
        admin.retry(2**63, conn=conn)
    for bad in ("x", "-1", 0, "1.5", True, None):
        with pytest.raises(errors.InvalidInput):
            admin.retry(bad, conn=conn)
    # in psql the same refusals are errors with stable SQLSTATEs
    with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState):
        conn.execute("SELECT jobrunner_retry(%s)", (queued.id,))
    with pytest.raises(psycopg.errors.NoDataFound):
        conn.execute("SELECT jobrunner_retry(%s)", (987_654,))
    with pytest.raises(psycopg.errors.InvalidParameterValue):
        conn.execute("SELECT jobrunner_retry(%s, extra_attempts => 0)", (queued.id,))


def test_retry_dead_by_queue_and_kind(db_url, conn):
    def dead(kind, queue_name="default", dedupe_key=None):
        job = queue.enqueue(kind, queue=queue_name, max_attempts=1, dedupe_key=dedupe_key, conn=conn)
        [c] = claim(conn, queue_name=queue_name)
        assert c.id == job.id
        assert fail(conn, job.id, 1) == {job.id: "dead"}
        return job.id

    a = dead("jobrunner.fail")
    b = dead("jobrunner.sleep")
    c = dead("jobrunner.fail", "other")
    keyed1 = dead("jobrunner.fail", "keyed", dedupe_key="k")
    keyed2 = dead("jobrunner.fail", "keyed", dedupe_key="k")   # the key was free again
    alive = queue.enqueue("jobrunner.noop", queue="other", conn=conn)

    assert admin.retry_dead(queue_name="nope", conn=conn) == []
    listener = notifications(db_url, "jobrunner_jobs")
    try:
        assert admin.retry_dead(kind="jobrunner.sleep", conn=conn) == [b]
        assert admin.retry_dead(queue_name="default", kind="jobrunner.fail", conn=conn) == [a]
        assert sorted(listener.drain()) == ["default", "default"]   # one per call and queue
        # two dead jobs with one dedupe key: only one may be active
        assert admin.retry_dead(conn=conn) == [c, keyed1]
        assert sorted(listener.drain()) == ["keyed", "other"]
    finally:
        listener.close()
    states = dict(conn.execute("SELECT id, state FROM jobs").fetchall())
    assert states == {a: "queued", b: "queued", c: "queued", keyed1: "queued", keyed2: "dead",
                      alive.id: "queued"}
    # the single retry says why it cannot
    with pytest.raises(errors.Conflict, match="dedupe_key"):
        admin.retry(keyed2, conn=conn)
    # SQL: ids come back as rows
    assert conn.execute("SELECT count(*) FROM jobrunner_retry_dead()").fetchone()[0] == 0


def test_cancel_function_and_notifications(db_url, conn):
    queued = queue.enqueue("jobrunner.sleep", conn=conn)
    running = queue.enqueue("jobrunner.sleep", conn=conn)
    claim(conn, limit=1)                       # the first one (lower id) runs
    queued, running = running, queued
    done = notifications(db_url, "jobrunner_done")
    stop = notifications(db_url, "jobrunner_cancel")
    try:
        first = row(conn, "SELECT * FROM jobrunner_cancel(%s)", (queued.id,))
        assert first["state"] == "cancelled" and first["finished_at"] is not None
        assert [json.loads(p) for p in done.drain()] == [{"id": queued.id, "state": "cancelled"}]
        got = row(conn, "SELECT * FROM jobrunner_cancel(%s)", (running.id,))
        assert got["state"] == "running" and got["cancel_requested"] is True
        assert stop.drain() == [str(running.id)]
        # finished: unchanged, no notification
        again = row(conn, "SELECT * FROM jobrunner_cancel(%s)", (queued.id,))
        assert again["state"] == "cancelled" and again["finished_at"] == first["finished_at"]
        assert done.drain() == []
    finally:
        done.close()
        stop.close()
    with pytest.raises(psycopg.errors.NoDataFound):
        conn.execute("SELECT * FROM jobrunner_cancel(424242)")
    # the Python API is the same function
    with pytest.raises(errors.JobNotFound):
        admin.cancel(424242, conn=conn)
    assert admin.cancel(str(queued.id), conn=conn).state == "cancelled"


def test_discard_only_finished_jobs(conn):
    done = queue.enqueue("jobrunner.noop", conn=conn)
    claim(conn)
    queue.complete(conn, "w1", [(done.id, 1, {"r": 1})])
    active = queue.enqueue("jobrunner.noop", conn=conn)
    with pytest.raises(errors.Conflict, match="cancel it first"):
        admin.discard(active.id, conn=conn)
    gone = admin.discard(done.id, conn=conn)
    assert gone.id == done.id and gone.state == "succeeded"
    assert conn.execute("SELECT count(*) FROM results").fetchone()[0] == 0
    with pytest.raises(errors.JobNotFound):
        admin.discard(done.id, conn=conn)
    assert queue.get(active.id, conn=conn).state == "queued"


def test_queue_stats_and_listing(conn):
    queue.enqueue_many("jobrunner.noop", [{}] * 3, conn=conn)
    queue.enqueue_many("jobrunner.noop", [{}] * 2, queue="mail", conn=conn)
    conn.execute("UPDATE jobs SET created_at = now() - interval '90 seconds' WHERE id = 1")
    claim(conn, limit=1)
    stats = {(r["queue"], r["state"]): r for r in admin.stats(conn=conn)}
    assert {k: r["count"] for k, r in stats.items()} == {
        ("default", "running"): 1, ("default", "queued"): 2, ("mail", "queued"): 2}
    assert stats[("default", "running")]["oldest_age_seconds"] >= 90
    assert stats[("mail", "queued")]["oldest_age_seconds"] < 90
    # keyset pages
    page1, nxt = admin.list_jobs(limit=2, conn=conn)
    assert [j["id"] for j in page1] == [1, 2] and nxt == 2
    page2, nxt = admin.list_jobs(limit=2, after=nxt, conn=conn)
    assert [j["id"] for j in page2] == [3, 4] and nxt == 4
    page3, nxt = admin.list_jobs(limit=2, after=nxt, conn=conn)
    assert [j["id"] for j in page3] == [5] and nxt is None
    mail, _ = admin.list_jobs(queue_name="mail", state="queued", conn=conn)
    assert [j["id"] for j in mail] == [4, 5]
    assert set(admin.job_json(mail[0])) == set(admin.JOB_FIELDS)
    for bad in (dict(state="nope"), dict(limit=0), dict(limit=501), dict(after=-1), dict(queue_name="")):
        with pytest.raises(errors.InvalidInput):
            admin.list_jobs(conn=conn, **bad)


def test_retry_racing_claims_never_corrupts_the_job(db_url, conn):
    """An operator's retry and two workers' claims hit the same job at once, many times.

    Each round starts from `failed` (claimable now) or `dead`; a barrier releases a retry
    and two claims together. Whatever the interleaving: at most one claim gets the job,
    attempts grow by exactly the number of claims, the retry is refused only when the job
    was running, the state is always one the rules allow, and the error history keeps
    one entry per attempt."""
    job = queue.enqueue("jobrunner.fail", max_attempts=1_000_000, conn=conn)
    conns = [psycopg.connect(db_url, autocommit=True) for _ in range(3)]
    rounds = 150
    outcome_counts = {"retried": 0, "refused": 0, "claimed": 0}
    try:
        [c] = claim(conn, worker="setup")
        fail(conn, job.id, 1, worker="setup")
        for i in range(rounds):
            before = queue.get(job.id, conn=conn)
            assert before.state in ("failed", "dead")
            barrier = threading.Barrier(3)
            results: dict[str, object] = {}

            def do_retry():
                barrier.wait()
                try:
                    results["retry"] = admin.retry(job.id, conn=conns[0])
                except errors.Conflict as exc:
                    results["retry"] = exc

            def do_claim(n):
                barrier.wait()
                results[f"w{n}"] = claim(conns[n], worker=f"w{n}")

            threads = [threading.Thread(target=do_retry),
                       threading.Thread(target=do_claim, args=(1,)),
                       threading.Thread(target=do_claim, args=(2,))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
                assert not t.is_alive()
            claimers = [w for w in ("w1", "w2") if results[w]]
            assert len(claimers) <= 1, f"round {i}: two workers claimed the job"
            after = queue.get(job.id, conn=conn)
            assert after.attempts == before.attempts + len(claimers), f"round {i}"
            retry = results["retry"]
            if isinstance(retry, errors.Conflict):
                outcome_counts["refused"] += 1
                # refused only because a claim had taken the (failed, runnable) job
                assert before.state == "failed" and claimers and "running" in str(retry)
            else:
                outcome_counts["retried"] += 1
                assert retry.state == "queued" and retry.attempts == before.attempts
            if claimers:
                outcome_counts["claimed"] += 1
                [got] = results[claimers[0]]
                assert got.attempts == after.attempts
                assert (after.state, after.worker_id) == ("running", claimers[0])
            else:
                assert after.state == "queued" and after.worker_id is None
                [got] = claim(conn, worker="w9")
                claimers = ["w9"]
            # finish the attempt: next round starts from failed or dead
            permanent = i % 2 == 1
            state = fail(conn, job.id, got.attempts, worker=claimers[0], permanent=permanent)
            assert state == {job.id: "dead" if permanent else "failed"}
            history = queue.get(job.id, conn=conn).errors
            assert [e["attempt"] for e in history] == list(range(1, got.attempts + 1))
            if not permanent:
                conn.execute("UPDATE jobs SET run_at = now() WHERE id = %s", (job.id,))
    finally:
        for c in conns:
            c.close()
    print("retry/claim race outcomes:", outcome_counts)
    # The race went both ways at least once (not a test that cannot fail).
    assert outcome_counts["retried"] > 0 and outcome_counts["claimed"] > 0, outcome_counts
