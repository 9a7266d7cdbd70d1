"""The real gunicorn (ASGI worker) against a test database: v1 report, errors, readiness."""
from __future__ import annotations

import random
import uuid

import psycopg
import pytest

from jobrunner.migrate import migrate

pytestmark = pytest.mark.e2e

REPORT = "/api/1.0/report/payments"


def sql_report(url: str) -> list[dict]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT user_id, sum(total)::bigint FROM orders GROUP BY user_id ORDER BY user_id").fetchall()
    return [{"user_id": u, "total_payment": t} for u, t in rows]


def insert_random_orders(url: str, count: int, seed: int) -> None:
    rng = random.Random(seed)
    users = [rng.randint(1, 2**31 - 1) for _ in range(50)] + [1, 2**31 - 1]
    with psycopg.connect(url) as conn:
        with conn.cursor().copy("COPY orders (user_id, total) FROM STDIN") as copy:
            for _ in range(count):
                copy.write_row((rng.choice(users), rng.randint(0, 2**31 - 1)))


def assert_error(resp, status: int, code: str) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"title", "description", "code"} and body["code"] == code, body
    assert resp.headers["x-request-id"]
    return body


def test_v1_lifecycle_from_empty_database(new_database, gunicorn):
    """readyz before/after migrations, the report vs SQL GROUP BY, 404, 405, request ids."""
    url = new_database(migrated=False)
    server = gunicorn(url)
    with server.client() as http:
        assert http.get("/healthz").json() == {"status": "ok"}
        before = http.get("/readyz")
        assert_error(before, 503, "migrations_pending")
        assert int(before.headers["retry-after"]) > 0
        assert http.get(REPORT).status_code == 503

        migrate(url)
        assert http.get("/readyz").status_code == 200
        assert http.get(REPORT).json() == {"data": []}

        insert_random_orders(url, 5000, seed=11)
        report = http.get(REPORT)
        assert report.status_code == 200
        assert report.headers["content-type"].startswith("application/json")
        expected = sql_report(url)
        assert len(expected) > 10
        assert report.json() == {"data": expected}

        assert_error(http.get("/no/such/route"), 404, "not_found")
        wrong = http.delete(REPORT)
        assert_error(wrong, 405, "method_not_allowed")
        assert "GET" in wrong.headers["allow"]

        mine = f"e2e-{uuid.uuid4().hex}"
        assert http.get("/healthz", headers={"X-Request-ID": mine}).headers["x-request-id"] == mine
        generated = http.get("/healthz", headers={"X-Request-ID": "x" * 500}).headers["x-request-id"]
        assert generated != "x" * 500 and len(generated) == 32
    server.stop()
    logs = server.logs()
    assert f"request_id={mine}" in logs  # the access log line carries the id
    assert "SIGTERM received: stopping" in logs and "API process stopped" in logs


def _stop_start(pg_server):
    """(stop, start) callables for the test database server, or skip."""
    if pg_server.kind != "embedded":
        pytest.skip("stopping an external server is not possible from the tests")
    from jobrunner import embedded
    return (lambda: embedded.stop(pg_server.data_dir)), (lambda: embedded.start(pg_server.data_dir))


@pytest.mark.fault
def test_503_while_database_stopped_then_200_without_restarting_gunicorn(new_database, gunicorn, pg_server):
    stop, start = _stop_start(pg_server)
    url = new_database()
    insert_random_orders(url, 500, seed=5)
    expected = {"data": sql_report(url)}
    server = gunicorn(url)
    with server.client() as http:
        assert http.get("/readyz").status_code == 200
        assert http.get(REPORT).json() == expected
        pid_before = server.process.pid
        stop()
        try:
            for path in ("/readyz", REPORT):
                resp = http.get(path, headers={"X-Request-ID": f"outage{path.replace('/', '-')}"})
                assert_error(resp, 503, "database_unavailable")
                assert int(resp.headers["retry-after"]) > 0
            assert http.get("/healthz").status_code == 200
        finally:
            start()
        # The database is back: the very next requests succeed (the pool checks and
        # replaces its broken connections on checkout).
        with psycopg.connect(url) as conn:
            conn.execute("SELECT 1")
        assert http.get("/readyz").status_code == 200
        assert http.get(REPORT).json() == expected
        assert server.alive() and server.process.pid == pid_before
    server.stop()
    logs = server.logs()
    assert "Traceback" not in logs
    for request_id in ("outage-readyz", "outage-api-1.0-report-payments"):
        # every 5xx is logged by the app with its request id (not only in the access log)
        assert f"api.errors request_id={request_id} " in logs


@pytest.mark.fault
def test_database_restart_is_transparent(new_database, gunicorn, pg_server):
    if pg_server.restart is None:
        pytest.skip("this database server cannot be restarted from the tests (set DB_RESTART_CMD)")
    url = new_database()
    insert_random_orders(url, 200, seed=9)
    expected = {"data": sql_report(url)}
    server = gunicorn(url)
    with server.client() as http:
        assert http.get("/readyz").status_code == 200  # the pool holds a connection now
        pg_server.restart()
        assert http.get("/readyz").status_code == 200
        assert http.get(REPORT).json() == expected
