"""Report API v2 end to end: the real gunicorn (ASGI worker) and real `jobrunner worker`
processes against a test database. Every response is validated against the served
OpenAPI document."""
from __future__ import annotations

import asyncio
import resource
import signal
import threading
import time
from pathlib import Path

import httpx
import psycopg
import pytest

from jobrunner import queue
from tests.e2e.test_api_v1 import insert_random_orders, sql_report
from tests.e2e.test_openapi import OpenAPI, check_exchange
from tests.workers import start_worker, wait_until  # noqa: F401 - start_worker is a fixture

pytestmark = pytest.mark.e2e

SUBMIT = "/api/2.0/report/payments"
FINAL = {"succeeded", "dead", "cancelled"}


def status_path(job_id) -> str:
    return f"{SUBMIT}/{job_id}"


class Checked:
    """An httpx client whose every response is checked against the OpenAPI document."""

    def __init__(self, http: httpx.Client) -> None:
        self.http = http
        self.api = OpenAPI(http.get("/openapi.json").json())

    def request(self, method: str, path: str, **kwargs) -> httpx.Response:
        resp = self.http.request(method, path, **kwargs)
        check_exchange(self.api, method, path, resp)
        assert resp.headers["x-request-id"]
        return resp


def assert_error(resp, status: int, code: str) -> None:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["code"] == code and set(body) == {"title", "description", "code"}, body


def jobs_count(url: str) -> int:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT count(*) FROM jobs WHERE kind = 'report.payments'").fetchone()[0]


def raise_open_files(n: int = 8192) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(n, hard), hard))


def test_submit_long_poll_and_result_equals_v1(db_url, gunicorn, start_worker):
    insert_random_orders(db_url, 3000, seed=5)
    server = gunicorn(db_url)
    worker = start_worker("--concurrency", "2", "--poll-interval", "1")
    worker.wait_listening()
    with server.client(timeout=90) as http:
        api = Checked(http)
        submitted = api.request("POST", SUBMIT)
        assert submitted.status_code == 202
        data = submitted.json()["data"]
        job_id = data["job_id"]
        assert data["status_url"] == status_path(job_id)
        assert submitted.headers["location"] == status_path(job_id)
        assert data["status"] in ("queued", "running", "succeeded")

        started = time.monotonic()
        done = api.request("GET", status_path(job_id) + "?wait=60")
        elapsed = time.monotonic() - started
        assert done.status_code == 200, done.text
        body = done.json()["data"]
        assert body["status"] == "succeeded" and body["job_id"] == job_id
        assert body["attempts"] == 1 and body["max_attempts"] >= 1
        assert body["finished_at"] and body["started_at"] and body["created_at"]
        # The job takes a second or so; half the wait is room enough for a busy machine
        # and still proves the answer came at completion, not at the deadline.
        assert elapsed < 30, "the long-poll was answered at its deadline, not at completion"

        v1 = api.request("GET", "/api/1.0/report/payments").json()
        assert body["result"] == v1 == {"data": sql_report(db_url)}
        assert len(v1["data"]) > 1

        # Final: a plain GET answers 200 at once; a new submit makes a new job.
        assert api.request("GET", status_path(job_id)).json()["data"] == body
        again = api.request("GET", SUBMIT)            # the legacy submit
        assert again.status_code == 202 and again.json()["data"]["job_id"] != job_id
        final = api.request("GET", status_path(again.json()["data"]["job_id"]) + "?wait=30")
        assert final.status_code == 200 and final.json()["data"]["result"] == v1


def test_pending_job_errors_and_cancel(db_url, gunicorn):
    """No worker runs: a long-poll ends at its deadline with 202 queued; bad input 400."""
    server = gunicorn(db_url)
    with server.client() as http:
        api = Checked(http)
        job_id = api.request("POST", SUBMIT).json()["data"]["job_id"]

        started = time.monotonic()
        pending = api.request("GET", status_path(job_id) + "?wait=1.5")
        assert time.monotonic() - started >= 1.4
        assert pending.status_code == 202
        assert int(pending.headers["retry-after"]) >= 1
        data = pending.json()["data"]
        assert data["status"] == "queued" and data["attempts"] == 0 and "result" not in data
        assert data["started_at"] is None and data["finished_at"] is None
        plain = api.request("GET", status_path(job_id))
        assert plain.status_code == 202 and plain.json()["data"]["status"] == "queued"

        for wait in ("0", "61", "abc", "-1", "nan", "inf", "", "60.5"):
            assert_error(api.request("GET", status_path(job_id) + f"?wait={wait}"), 400, "invalid_wait")
        assert_error(api.request("GET", status_path(job_id) + "?wait=1&wait=2"), 400, "invalid_wait")
        for bad in ("abc", "-1", "1.5", "1e3", "99999999999999999999", "9223372036854775808"):
            assert_error(api.request("GET", status_path(bad)), 400, "invalid_job_id")
            assert_error(api.request("DELETE", status_path(bad)), 400, "invalid_job_id")
        for unknown in ("0", str(job_id + 1000), "9223372036854775807"):
            assert_error(api.request("GET", status_path(unknown) + "?wait=5"), 404, "job_not_found")
            assert_error(api.request("DELETE", status_path(unknown)), 404, "job_not_found")
        # Jobs of other kinds are not report jobs.
        with psycopg.connect(db_url) as conn:
            other = queue.enqueue("jobrunner.noop", conn=conn).id
        assert_error(api.request("GET", status_path(other)), 404, "job_not_found")
        for key in ("", "a" * 256, "key;1", "a b", "k\"y"):
            assert_error(api.request("POST", SUBMIT, headers={"Idempotency-Key": key}),
                         400, "invalid_idempotency_key")
        assert_error(api.request("PUT", SUBMIT), 405, "method_not_allowed")

        cancelled = api.request("DELETE", status_path(job_id))
        assert cancelled.status_code == 200
        assert cancelled.json()["data"]["status"] == "cancelled"
        assert cancelled.json()["data"]["finished_at"]
        final = api.request("GET", status_path(job_id) + "?wait=30")
        assert final.status_code == 200 and final.json()["data"]["status"] == "cancelled"
        assert api.request("DELETE", status_path(job_id)).json()["data"]["status"] == "cancelled"


def test_concurrent_submits_make_one_job_and_idempotency_keys_hold(db_url, gunicorn):
    server = gunicorn(db_url)

    async def submit_many(n: int, headers=None) -> list[httpx.Response]:
        async with server.async_client(limits=httpx.Limits(max_connections=n)) as http:
            return await asyncio.gather(*(http.post(SUBMIT, headers=headers) for _ in range(n)))

    responses = asyncio.run(submit_many(50))
    assert {r.status_code for r in responses} == {202}
    ids = {r.json()["data"]["job_id"] for r in responses}
    assert len(ids) == 1 and jobs_count(db_url) == 1
    (first,) = ids

    with server.client() as http:
        api = Checked(http)
        # The same key: the same job, also after that job finished; no key: a new job.
        keyed = api.request("POST", SUBMIT, headers={"Idempotency-Key": "order-42:report"})
        assert keyed.json()["data"]["job_id"] == first
        assert api.request("DELETE", status_path(first)).json()["data"]["status"] == "cancelled"
        replay = api.request("POST", SUBMIT, headers={"Idempotency-Key": "order-42:report"})
        assert replay.status_code == 202
        assert replay.json()["data"] == {"job_id": first, "status": "cancelled",
                                         "status_url": status_path(first)}
        assert replay.headers["location"] == status_path(first)
        fresh = api.request("POST", SUBMIT).json()["data"]["job_id"]
        assert fresh != first
        other_key = api.request("POST", SUBMIT, headers={"Idempotency-Key": "another-key"})
        assert other_key.json()["data"]["job_id"] == fresh          # joined the active job
        assert api.request("DELETE", status_path(fresh)).status_code == 200

    # Concurrent requests with one new key while nothing is active: one job, one key.
    responses = asyncio.run(submit_many(20, headers={"Idempotency-Key": "burst-1"}))
    ids = {r.json()["data"]["job_id"] for r in responses}
    assert len(ids) == 1 and not ids & {first, fresh}
    assert jobs_count(db_url) == 3
    with psycopg.connect(db_url) as conn:
        keys = dict(conn.execute("SELECT key, job_id FROM idempotency_keys").fetchall())
    assert keys == {"order-42:report": first, "another-key": fresh, "burst-1": ids.pop()}


def _poll_in_thread(server, path: str, timeout: float = 90) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def run() -> None:
        try:
            with server.client(timeout=timeout) as http:
                out["response"] = http.get(path)
                out["at"] = time.monotonic()
        except Exception as exc:  # noqa: BLE001 - reported by the test
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def test_long_poll_survives_a_database_restart(pg_server, db_url, gunicorn, start_worker):
    if pg_server.restart is None:
        pytest.skip("this server cannot be restarted by the test suite")
    server = gunicorn(db_url)
    with server.client() as http:
        job_id = http.post(SUBMIT).json()["data"]["job_id"]
    thread, out = _poll_in_thread(server, status_path(job_id) + "?wait=45")
    time.sleep(1.0)                        # the long-poll is waiting
    pg_server.restart()
    worker = start_worker("--concurrency", "1", "--poll-interval", "1")
    thread.join(90)
    assert "error" not in out, out.get("error")
    resp = out["response"]
    assert resp.status_code == 200, resp.text
    assert resp.json()["data"]["status"] == "succeeded"
    assert resp.json()["data"]["result"] == {"data": []}
    assert worker.alive()
    assert "listener: listening on jobrunner_done (reconnected" in server.logs()


def test_sigterm_answers_waiting_long_polls_at_once(db_url, gunicorn):
    server = gunicorn(db_url)
    with server.client() as http:
        job_id = http.post(SUBMIT).json()["data"]["job_id"]
    thread, out = _poll_in_thread(server, status_path(job_id) + "?wait=60")
    time.sleep(1.0)
    signalled = time.monotonic()
    server.send_signal(signal.SIGTERM)
    thread.join(60)
    assert "error" not in out, out.get("error")
    assert out["response"].status_code == 202
    assert out["response"].json()["data"]["status"] == "queued"
    assert out["at"] - signalled < 30, "answered at the wait deadline, not at shutdown"
    assert server.process.wait(60) == 0


def test_client_disconnect_ends_the_wait(db_url, gunicorn):
    server = gunicorn(db_url, env={"LOG_LEVEL": "debug"})
    with server.client() as http:
        job_id = http.post(SUBMIT).json()["data"]["job_id"]
    with pytest.raises(httpx.ReadTimeout):
        with server.client(timeout=1.0) as http:
            http.get(status_path(job_id) + "?wait=60")
    wait_until(lambda: f"long-poll of job {job_id}: client went away" in server.logs(),
               timeout=30, what="the server to notice the client went away")


def _listener_backends(url: str) -> list[tuple[int, str, str]]:
    with psycopg.connect(url) as conn:
        return conn.execute(
            "SELECT pid, application_name, query FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name LIKE 'jobrunner-api-listener:%'"
        ).fetchall()


def _api_pool_backends(url: str) -> int:
    with psycopg.connect(url) as conn:
        return conn.execute(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name = 'jobrunner-api'").fetchone()[0]


def _parent_pid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("PPid:"):
            return int(line.split()[1])
    raise AssertionError(f"no PPid for {pid}")


def test_thousand_long_polls_on_one_process_share_one_listener(db_url, gunicorn, start_worker):
    raise_open_files()
    jobs, per_job = 50, 20
    with psycopg.connect(db_url, autocommit=True) as conn:
        ids = queue.enqueue_many("report.payments", [{} for _ in range(jobs)], conn=conn)
    server = gunicorn(db_url, env={"DB_POOL_MAX_SIZE": "10"})
    state: dict = {}

    async def main() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=jobs * per_job + 10, max_keepalive_connections=0)
        async with server.async_client(timeout=90, limits=limits) as http:
            async def poll(job_id: int) -> tuple[httpx.Response, float]:
                resp = await http.get(status_path(job_id) + "?wait=60")
                return resp, time.monotonic()

            tasks = [asyncio.ensure_future(poll(j)) for j in ids for _ in range(per_job)]
            await asyncio.sleep(3.0)   # let every request reach the server and wait
            assert not any(t.done() for t in tasks), "a long-poll returned before any job ran"
            state["listeners"] = await asyncio.to_thread(_listener_backends, db_url)
            state["pool"] = await asyncio.to_thread(_api_pool_backends, db_url)
            state["worker_started"] = time.monotonic()
            await asyncio.to_thread(lambda: start_worker("--concurrency", "4", "--poll-interval", "1"))
            return await asyncio.gather(*tasks)

    results = asyncio.run(main())
    assert len(results) == jobs * per_job
    for resp, at in results:
        assert resp.status_code == 200, resp.text
        data = resp.json()["data"]
        assert data["status"] == "succeeded" and data["result"] == {"data": []}
        assert at > state["worker_started"]
    assert {resp.json()["data"]["job_id"] for resp, _ in results} == set(ids)
    # One LISTEN connection, belonging to the one gunicorn worker process.
    listeners = state["listeners"]
    assert len(listeners) == 1, listeners
    assert listeners[0][2].upper().startswith("LISTEN"), listeners
    pid = int(listeners[0][1].rsplit(":", 1)[1])
    assert _parent_pid(pid) == server.process.pid
    # The waiters held no pool connections while they waited.
    assert state["pool"] <= 10
