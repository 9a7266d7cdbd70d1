"""Failed jobs end to end: real `jobrunner worker` processes, the real CLI, the real
gunicorn serving the admin API, against a test database.

- a jobrunner.fail job (max_attempts 3) is visible in failed_jobs while it retries and in
  dead_jobs afterwards with 3 errors; it is retried through SQL, the CLI and the admin
  API, and the worker runs it again each time;
- a report.payments job whose first attempt loses its database connection (the test
  terminates the backend while the aggregation waits for a table lock) succeeds on its
  second attempt: its results row says attempts = 2;
- operators retrying a job while two workers claim and fail it never corrupt it;
- the admin API is off without ADMIN_TOKEN (404), 401 without the right token; the report
  endpoints need API_TOKEN when it is set.
"""
from __future__ import annotations

import json
import subprocess
import sys
import threading

import httpx
import psycopg
import pytest
from psycopg.rows import dict_row

from jobrunner import admin, config, errors, queue
from tests.e2e.test_api_v1 import insert_random_orders, sql_report
from tests.e2e.test_openapi import OpenAPI, check_exchange
from tests.workers import start_worker, wait_until  # noqa: F401 - start_worker is a fixture

pytestmark = pytest.mark.e2e

ADMIN_TOKEN = "admin-secret-token"
API_TOKEN = "report-secret-token"


def one(conn, sql, params=()):
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(sql, params).fetchone()


def cli(db_url, *args):
    return subprocess.run([sys.executable, "-m", "jobrunner", *args],
                          env={"DATABASE_URL": db_url, "PATH": "/usr/bin:/bin", "LOG_LEVEL": "warning"},
                          cwd=config.ROOT, capture_output=True, text=True, timeout=60)


class Checked:
    """httpx client whose responses are validated against the served OpenAPI document."""

    def __init__(self, http: httpx.Client) -> None:
        self.http = http
        self.api = OpenAPI(http.get("/openapi.json").json())

    def request(self, method: str, path: str, token: str | None = None, **kwargs) -> httpx.Response:
        headers = kwargs.pop("headers", {})
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        resp = self.http.request(method, path, headers=headers, **kwargs)
        check_exchange(self.api, method, path, resp)
        return resp


def wait_dead(conn, job_id, attempts):
    return wait_until(lambda: (r := one(conn, "SELECT * FROM dead_jobs WHERE id = %s", (job_id,)))
                      and r["attempts"] == attempts and r, timeout=60, what=f"dead after {attempts}")


def test_fail_job_is_listed_dies_and_is_retried_by_sql_cli_and_admin_api(
        db_url, conn, start_worker, gunicorn):
    server = gunicorn(db_url, env={"ADMIN_TOKEN": ADMIN_TOKEN})
    worker = start_worker("--concurrency", "2", "--poll-interval", "1")
    job = queue.enqueue("jobrunner.fail", {"message": "always fails"}, max_attempts=3, conn=conn)

    # Between its first and third failure it is listed as retrying (not dead).
    retrying = wait_until(
        lambda: one(conn, "SELECT * FROM failed_jobs WHERE id = %s AND state <> 'dead'", (job.id,)),
        timeout=60, interval=0.01, what="the job to show in failed_jobs while retrying")
    assert 1 <= retrying["errors_count"] < 3 and retrying["last_error"] == "always fails"

    dead = wait_dead(conn, job.id, 3)
    assert dead["errors_count"] == 3 and dead["max_attempts"] == 3
    assert [e["attempt"] for e in dead["errors"]] == [1, 2, 3]
    assert all(e["error_type"] == "RuntimeError" and e["worker"].startswith(worker.id_prefix)
               for e in dead["errors"])
    assert one(conn, "SELECT state FROM failed_jobs WHERE id = %s", (job.id,))["state"] == "dead"

    # 1. SQL: back to queued, the worker runs it once more (one attempt granted), dead again.
    conn.execute("SELECT jobrunner_retry(%s)", (job.id,))
    assert len(wait_dead(conn, job.id, 4)["errors"]) == 4

    # 2. CLI
    out = cli(db_url, "retry", str(job.id))
    assert out.returncode == 0, out.stderr
    assert f"job {job.id} queued" in out.stdout
    assert len(wait_dead(conn, job.id, 5)["errors"]) == 5
    failed = cli(db_url, "failed", "--json")
    assert failed.returncode == 0, failed.stderr
    [listed] = [r for r in json.loads(failed.stdout) if r["id"] == job.id]
    assert (listed["state"], listed["attempts"], listed["errors_count"]) == ("dead", 5, 5)
    table = cli(db_url, "failed")
    assert table.returncode == 0 and "always fails" in table.stdout and "5/5" in table.stdout
    stats = cli(db_url, "stats", "--json")
    assert {"queue": "default", "state": "dead", "count": 1} in [
        {k: r[k] for k in ("queue", "state", "count")} for r in json.loads(stats.stdout)]

    # 3. Admin API
    with server.client() as raw:
        http = Checked(raw)
        resp = http.request("POST", f"/api/admin/jobs/{job.id}/retry", ADMIN_TOKEN)
        assert resp.status_code == 200, resp.text
        data = resp.json()["data"]
        assert (data["id"], data["state"], data["attempts"], data["max_attempts"]) == (job.id, "queued", 5, 6)
        assert len(data["errors"]) == 5
        assert len(wait_dead(conn, job.id, 6)["errors"]) == 6
        page = http.request("GET", "/api/admin/jobs?state=dead&queue=default", ADMIN_TOKEN).json()
        assert [j["id"] for j in page["data"]] == [job.id] and page["next"] is None
        assert [e["attempt"] for e in page["data"][0]["errors"]] == [1, 2, 3, 4, 5, 6]
        # a dead job cannot be cancelled (unchanged) and a second retry while it runs is refused
        resp = http.request("POST", f"/api/admin/jobs/{job.id}/cancel", ADMIN_TOKEN)
        assert resp.status_code == 200 and resp.json()["data"]["state"] == "dead"
        resp = http.request("GET", "/api/admin/stats", ADMIN_TOKEN)
        assert {"queue": "default", "state": "dead", "count": 1} in [
            {k: r[k] for k in ("queue", "state", "count")} for r in resp.json()["data"]]


def test_report_job_survives_a_dropped_connection_and_succeeds_on_attempt_2(
        db_url, conn, start_worker):
    insert_random_orders(db_url, 2000, seed=6)
    expected = sql_report(db_url)
    # Hold the orders table so the first attempt's aggregation waits for its lock, then
    # drop its connection: a transient failure mid-aggregation.
    locker = psycopg.connect(db_url)
    try:
        locker.execute("LOCK TABLE orders IN ACCESS EXCLUSIVE MODE")
        job = queue.enqueue("report.payments", conn=conn)
        start_worker("--concurrency", "1", "--poll-interval", "0.5")
        waiting = wait_until(lambda: [r[0] for r in conn.execute(
            "SELECT l.pid FROM pg_locks l WHERE NOT l.granted AND l.relation = 'orders'::regclass "
            "AND l.pid <> pg_backend_pid()")], timeout=60, what="the aggregation to wait for its lock")
        for pid in waiting:
            conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
        first = wait_until(lambda: (j := queue.get(job.id, conn=conn)).errors and j,
                           timeout=60, what="the first attempt to fail")
        assert first.attempts == 1 and first.state in ("failed", "queued", "running")
    finally:
        locker.rollback()
        locker.close()
    done = wait_until(lambda: (j := queue.get(job.id, conn=conn)).state in ("succeeded", "dead") and j,
                      timeout=90, what="the report job to finish")
    assert done.state == "succeeded", done.errors
    assert done.attempts == 2 and [e["attempt"] for e in done.errors] == [1]
    assert "connection" in done.errors[0]["message"].lower(), done.errors[0]
    result = one(conn, "SELECT attempts, result FROM results WHERE job_id = %s", (job.id,))
    assert result["attempts"] == 2
    assert result["result"] == {"data": expected}


def test_report_job_out_of_attempts_is_reported_dead_by_the_v2_long_poll(
        db_url, conn, start_worker, gunicorn):
    """Every attempt of a v2 report job loses its connection: after its 3 attempts the
    long-poll answers dead, with the last error and the attempt count."""
    server = gunicorn(db_url)
    locker = psycopg.connect(db_url)
    stop = threading.Event()
    killed: list[int] = []

    def kill_waiting_aggregations():
        with psycopg.connect(db_url, autocommit=True) as own:
            while not stop.is_set():
                for (pid,) in own.execute(
                        "SELECT l.pid FROM pg_locks l WHERE NOT l.granted "
                        "AND l.relation = 'orders'::regclass AND l.pid <> pg_backend_pid()").fetchall():
                    own.execute("SELECT pg_terminate_backend(%s)", (pid,))
                    killed.append(pid)
                stop.wait(0.05)

    killer = threading.Thread(target=kill_waiting_aggregations)
    try:
        locker.execute("LOCK TABLE orders IN ACCESS EXCLUSIVE MODE")
        killer.start()
        start_worker("--concurrency", "1", "--poll-interval", "0.5")
        with server.client() as raw:
            http = Checked(raw)
            resp = http.request("POST", "/api/2.0/report/payments")
            assert resp.status_code == 202, resp.text
            status_url = resp.json()["data"]["status_url"]
            for _ in range(10):
                resp = http.request("GET", status_url + "?wait=30")
                if resp.status_code == 200:
                    break
            assert resp.status_code == 200, resp.text
            data = resp.json()["data"]
    finally:
        stop.set()
        if killer.is_alive():
            killer.join(30)
        locker.rollback()
        locker.close()
    assert (data["status"], data["attempts"], data["max_attempts"]) == ("dead", 3, 3), data
    assert "connection" in data["last_error"].lower() and "result" not in data
    assert len(killed) >= 3
    dead = one(conn, "SELECT * FROM dead_jobs WHERE id = %s", (data["job_id"],))
    assert [e["attempt"] for e in dead["errors"]] == [1, 2, 3]


def test_retries_racing_two_real_workers_never_corrupt_the_job(db_url, conn, start_worker):
    """Three threads keep retrying a job that two worker processes keep claiming and
    failing (max_attempts 1, so every retry grants exactly one more run)."""
    workers = [start_worker("--concurrency", "2", "--poll-interval", "0.2") for _ in range(2)]
    job = queue.enqueue("jobrunner.fail", {"message": "again"}, max_attempts=1, conn=conn)
    wait_dead(conn, job.id, 1)
    target = 25
    lock = threading.Lock()
    granted: list[int] = []
    refused = [0]
    stop = threading.Event()

    def hammer():
        with psycopg.connect(db_url, autocommit=True) as own:
            while not stop.is_set():
                try:
                    retried = admin.retry(job.id, conn=own)
                except errors.Conflict:
                    with lock:
                        refused[0] += 1
                    continue
                assert retried.state == "queued"
                with lock:
                    granted.append(retried.attempts)
                    if len(granted) >= target:
                        stop.set()

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    stop.set()
    assert not any(t.is_alive() for t in threads)
    assert len(granted) >= target and refused[0] > 0
    # every granted retry happened at a distinct attempt count, in order
    assert granted == sorted(granted) and len(set(granted)) == len(granted)
    final = wait_dead(conn, job.id, 1 + len(granted))
    assert final["max_attempts"] == final["attempts"]
    assert [e["attempt"] for e in final["errors"]] == list(range(1, final["attempts"] + 1))
    prefixes = tuple(w.id_prefix for w in workers)
    assert all(e["worker"].startswith(prefixes) for e in final["errors"])
    assert one(conn, "SELECT count(*) AS n FROM results WHERE job_id = %s", (job.id,))["n"] == 0


def test_admin_api_is_off_without_admin_token_and_reports_stay_open(db_url, gunicorn):
    server = gunicorn(db_url)
    with server.client() as raw:
        http = Checked(raw)
        for path in ("/api/admin/jobs", "/api/admin/stats", "/api/admin/jobs/1"):
            resp = http.request("GET", path, ADMIN_TOKEN)
            assert resp.status_code == 404 and resp.json()["code"] == "not_found"
            assert "www-authenticate" not in resp.headers
        assert http.request("POST", "/api/admin/jobs/1/retry").status_code == 404
        assert http.request("GET", "/api/1.0/report/payments").status_code == 200
        doc = raw.get("/openapi.json").json()
        assert set(doc["components"]["securitySchemes"]) == {"adminToken", "apiToken"}


def test_admin_and_api_tokens(db_url, conn, gunicorn):
    server = gunicorn(db_url, env={"ADMIN_TOKEN": ADMIN_TOKEN, "API_TOKEN": API_TOKEN})
    job = queue.enqueue("jobrunner.noop", conn=conn)
    with server.client() as raw:
        http = Checked(raw)
        # admin: missing, wrong, malformed, the report token: 401
        for token, headers in ((None, {}), ("wrong", {}), (API_TOKEN, {}), (ADMIN_TOKEN + "x", {}),
                               (None, {"Authorization": ADMIN_TOKEN}),
                               (None, {"Authorization": f"Basic {ADMIN_TOKEN}"})):
            resp = http.request("GET", "/api/admin/jobs", token, headers=headers)
            assert resp.status_code == 401, (token, headers)
            assert resp.headers["www-authenticate"].startswith('Bearer realm="jobrunner-admin"')
            assert resp.json()["code"] == "unauthorized"
        resp = http.request("POST", f"/api/admin/jobs/{job.id}/cancel", "wrong")
        assert resp.status_code == 401
        assert queue.get(job.id, conn=conn).state == "queued"      # nothing happened
        # the right token; the scheme is case-insensitive
        resp = http.request("GET", "/api/admin/jobs", headers={"Authorization": f"bearer {ADMIN_TOKEN}"})
        assert resp.status_code == 200 and [j["id"] for j in resp.json()["data"]] == [job.id]
        # bad parameters: 400
        for query in ("limit=0", "limit=501", "limit=x", "after=-1", "state=bogus", "status=dead",
                      "limit=1&limit=2", "after=99999999999999999999", "queue=%00",
                      "kind=%00abc", "queue=a%0Ab", "kind=" + "k" * 201):
            resp = http.request("GET", f"/api/admin/jobs?{query}", ADMIN_TOKEN)
            assert resp.status_code == 400, query
            assert resp.json()["code"] == "invalid_input"
        assert http.request("POST", "/api/admin/jobs/abc/retry", ADMIN_TOKEN).status_code == 400
        assert http.request("POST", "/api/admin/jobs/999999/retry", ADMIN_TOKEN).status_code == 404
        resp = http.request("POST", f"/api/admin/jobs/{job.id}/retry", ADMIN_TOKEN)
        assert resp.status_code == 409 and "queued" in resp.json()["description"]
        assert http.request("DELETE", f"/api/admin/jobs/{job.id}", ADMIN_TOKEN).status_code == 409
        resp = http.request("POST", f"/api/admin/jobs/{job.id}/cancel", ADMIN_TOKEN)
        assert resp.status_code == 200 and resp.json()["data"]["state"] == "cancelled"
        assert http.request("GET", f"/api/admin/jobs/{job.id}", ADMIN_TOKEN).json()["data"]["state"] == "cancelled"
        assert http.request("DELETE", f"/api/admin/jobs/{job.id}", ADMIN_TOKEN).status_code == 200
        assert http.request("GET", f"/api/admin/jobs/{job.id}", ADMIN_TOKEN).status_code == 404
        assert http.request("GET", "/api/admin/stats", ADMIN_TOKEN).json() == {"data": []}
        # reports: API_TOKEN required (the admin token is not a report token)
        for token in (None, "wrong", ADMIN_TOKEN):
            resp = http.request("GET", "/api/1.0/report/payments", token)
            assert resp.status_code == 401, token
            assert resp.headers["www-authenticate"].startswith('Bearer realm="jobrunner"')
        assert http.request("GET", "/api/1.0/report/payments", API_TOKEN).json() == {"data": []}
        if "/api/2.0/report/payments" in http.api.doc["paths"]:
            assert http.request("POST", "/api/2.0/report/payments").status_code == 401
        # operations endpoints stay open
        assert http.request("GET", "/healthz").status_code == 200
        assert http.request("GET", "/readyz").status_code == 200
