"""The API in-process (falcon.testing.ASGIConductor, lifespan included) on a real database."""
from __future__ import annotations

import asyncio
import random

import psycopg
import pytest
from falcon import testing

from api.app import create_app

REPORT = "/api/1.0/report/payments"
# A port nothing listens on: the database is "down".
UNREACHABLE_URL = "postgresql://jobrunner@127.0.0.1:9/nowhere?connect_timeout=2"


def call(url: str, *requests: tuple[str, str], headers: dict | None = None):
    """Start the app (lifespan: pool open), make the requests in order, stop it."""
    async def run():
        results = []
        async with testing.ASGIConductor(create_app(url)) as conductor:
            for method, path in requests:
                results.append(await conductor.simulate_request(method, path, headers=headers))
        return results
    return asyncio.run(run())


def sql_report(conn) -> list[dict]:
    rows = conn.execute(
        "SELECT user_id, sum(total)::bigint FROM orders GROUP BY user_id ORDER BY user_id").fetchall()
    return [{"user_id": u, "total_payment": t} for u, t in rows]


def insert_orders(conn, rows) -> None:
    with conn.cursor().copy("COPY orders (user_id, total) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)


def assert_error(resp, status: int, code: str) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json
    assert set(body) == {"title", "description", "code"}, body
    assert body["code"] == code
    assert body["title"] and body["description"]
    assert resp.headers["content-type"].startswith("application/json")
    return body


def test_healthz_and_readyz_on_migrated_database(db_url):
    health, ready = call(db_url, ("GET", "/healthz"), ("GET", "/readyz"))
    assert health.status_code == 200 and health.json == {"status": "ok"}
    assert ready.status_code == 200
    assert ready.json["status"] == "ready"
    with psycopg.connect(db_url) as conn:
        latest = conn.execute("SELECT max(version) FROM schema_migrations").fetchone()[0]
    assert ready.json["schema_version"] == latest


def test_readyz_503_until_migrated(new_database):
    url = new_database(migrated=False)
    (ready,) = call(url, ("GET", "/readyz"))
    body = assert_error(ready, 503, "migrations_pending")
    assert "001" in body["description"]
    assert ready.headers["retry-after"].isdigit()


def test_report_empty_table_and_unmigrated(new_database):
    (empty,) = call(new_database(), ("GET", REPORT))
    assert empty.status_code == 200 and empty.json == {"data": []}
    (unmigrated,) = call(new_database(migrated=False), ("GET", REPORT))
    assert unmigrated.status_code == 503, unmigrated.text
    assert unmigrated.json["code"] in ("database_not_migrated", "database_unavailable")


def test_report_equals_sql_group_by(conn, db_url):
    rng = random.Random(3)
    users = [rng.randint(1, 2**31 - 1) for _ in range(40)] + [1, 2**31 - 1]
    rows = [(rng.choice(users), rng.randint(0, 2**31 - 1)) for _ in range(3000)]
    rows += [(7, 2**31 - 1)] * 3  # one user's sum exceeds 2^31
    insert_orders(conn, rows)
    (resp,) = call(db_url, ("GET", REPORT))
    assert resp.status_code == 200
    assert resp.json == {"data": sql_report(conn)}
    assert any(item["total_payment"] > 2**31 for item in resp.json["data"])


def test_database_unreachable_gives_503_with_retry_after():
    health, ready, report = call(UNREACHABLE_URL, ("GET", "/healthz"), ("GET", "/readyz"), ("GET", REPORT))
    assert health.status_code == 200  # liveness does not depend on the database
    for resp in (ready, report):
        assert_error(resp, 503, "database_unavailable")
        assert int(resp.headers["retry-after"]) > 0


def test_unknown_route_and_wrong_method(db_url):
    missing, wrong = call(db_url, ("GET", "/api/1.0/nope"), ("POST", REPORT))
    assert_error(missing, 404, "not_found")
    body = assert_error(wrong, 405, "method_not_allowed")
    assert "GET" in wrong.headers["allow"]
    assert "POST" in body["description"]


def test_request_id_taken_when_sane_generated_otherwise(db_url):
    (kept,) = call(db_url, ("GET", "/healthz"), headers={"X-Request-ID": "abc-123.x:y_z"})
    assert kept.headers["x-request-id"] == "abc-123.x:y_z"
    (replaced,) = call(db_url, ("GET", "/api/1.0/nope"), headers={"X-Request-ID": "bad id\twith spaces"})
    generated = replaced.headers["x-request-id"]
    assert generated != "bad id\twith spaces" and len(generated) == 32
    int(generated, 16)


def test_openapi_document_served(db_url):
    (resp,) = call(db_url, ("GET", "/openapi.json"))
    assert resp.status_code == 200
    doc = resp.json
    assert doc["openapi"].startswith("3.1")
    for path in ("/healthz", "/readyz", REPORT, "/openapi.json"):
        assert "get" in doc["paths"][path]


def test_report_runs_off_the_event_loop(db_url, monkeypatch):
    """While a report is being computed, the same process keeps answering.

    The aggregation below only finishes once /healthz has been answered: were it run
    on the event loop, /healthz could not be served and the report would fail.
    """
    import threading

    from jobrunner import aggregate

    healthz_answered = threading.Event()
    real_payments = aggregate.payments

    def slow_payments(url, **kwargs):
        if not healthz_answered.wait(timeout=30):
            raise RuntimeError("the event loop was blocked while the report ran")
        return real_payments(url, **kwargs)

    monkeypatch.setattr(aggregate, "payments", slow_payments)

    async def run():
        async with testing.ASGIConductor(create_app(db_url)) as conductor:
            report = asyncio.create_task(conductor.simulate_get(REPORT))
            await asyncio.sleep(0)  # let the report start first
            health = await conductor.simulate_get("/healthz")
            assert not report.done()
            healthz_answered.set()
            return health, await report

    health, report = asyncio.run(run())
    assert health.status_code == 200
    assert report.status_code == 200 and report.json == {"data": []}
