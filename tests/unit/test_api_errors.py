"""api/errors.py: every exception becomes {"title", "description", "code"} with the right status."""
from __future__ import annotations

import asyncio

import asyncpg.exceptions
import falcon
import psycopg
import psycopg.errors
import pytest
from falcon import testing
from psycopg_pool import PoolTimeout

from api import errors as api_errors
from api.app import create_app
from jobrunner import errors

# The app never reaches this database in these tests (no route here touches it).
NOWHERE = "postgresql://jobrunner@127.0.0.1:9/nowhere?connect_timeout=1"


@pytest.fixture
def req():
    return testing.create_req(method="GET", path="/some/where")


@pytest.mark.parametrize(("ex", "status", "code"), [
    (errors.InvalidInput("wait must be 1..60"), 400, "invalid_input"),
    (errors.NotFound("no such thing"), 404, "not_found"),
    (errors.JobNotFound(42), 404, "job_not_found"),
    (errors.Conflict("already done"), 409, "conflict"),
    (errors.DatabaseUnavailable("down"), 503, "database_unavailable"),
    (errors.MigrationsPending("002 pending"), 503, "migrations_pending"),
])
def test_domain_errors(req, ex, status, code):
    got_status, body, headers = api_errors.describe(req, ex)
    assert (got_status, body["code"]) == (status, code)
    assert body["title"] == falcon.code_to_http_status(status)
    assert body["description"] == str(ex)
    assert ("Retry-After" in headers) == (status == 503)


def test_unmapped_domain_error_is_a_500_without_internals(req):
    status, body, _ = api_errors.describe(req, errors.JobrunnerError("secret internal detail"))
    assert status == 500 and body["code"] == "internal_error"
    assert "secret" not in body["description"]


@pytest.mark.parametrize("ex", [
    psycopg.OperationalError("connection refused"),
    psycopg.errors.AdminShutdown("terminating connection"),
    PoolTimeout("couldn't get a connection"),
    asyncpg.exceptions.ConnectionDoesNotExistError("closed"),
    asyncpg.exceptions.CannotConnectNowError("starting up"),
    ConnectionRefusedError(111, "refused"),
])
def test_unreachable_database_is_503_with_retry_after(req, ex):
    status, body, headers = api_errors.describe(req, ex)
    assert status == 503 and body["code"] == "database_unavailable"
    assert int(headers["Retry-After"]) > 0


@pytest.mark.parametrize("ex", [
    psycopg.errors.UntranslatableCharacter("unsupported Unicode escape sequence"),
    psycopg.errors.DatetimeFieldOverflow("interval out of range"),
    psycopg.errors.NumericValueOutOfRange("integer out of range"),
    asyncpg.exceptions.CharacterNotInRepertoireError("invalid byte sequence"),
])
def test_value_the_database_refuses_is_400_invalid_input(req, ex):
    status, body, headers = api_errors.describe(req, ex)
    assert (status, body["code"], headers) == (400, "invalid_input", {})
    assert str(ex) not in body["description"]


@pytest.mark.parametrize("ex", [psycopg.errors.UndefinedTable("no orders"),
                                asyncpg.exceptions.UndefinedTableError("no orders")])
def test_missing_table_is_503_not_migrated(req, ex):
    status, body, headers = api_errors.describe(req, ex)
    assert (status, body["code"]) == (503, "database_not_migrated")
    assert "Retry-After" in headers


def test_falcon_errors_keep_status_headers_and_texts(req):
    status, body, headers = api_errors.describe(
        req, falcon.HTTPMethodNotAllowed(["GET", "POST"]))
    assert status == 405 and body["code"] == "method_not_allowed"
    assert "GET" in headers["Allow"] and "GET" in body["description"]
    status, body, _ = api_errors.describe(req, falcon.HTTPRouteNotFound())
    assert (status, body["code"], body["title"]) == (404, "not_found", "404 Not Found")
    assert "/some/where" in body["description"]
    status, body, _ = api_errors.describe(
        req, falcon.HTTPBadRequest(title="Bad wait", description="wait must be 1..60", code="bad_wait"))
    assert (status, body) == (400, {"title": "Bad wait", "description": "wait must be 1..60", "code": "bad_wait"})


def test_code_for_status():
    assert api_errors.code_for_status(404) == "not_found"
    assert api_errors.code_for_status(415) == "unsupported_media_type"
    assert api_errors.code_for_status(503) == "service_unavailable"


def _request_through_app(resource, *, headers=None):
    app = create_app(NOWHERE)
    app.add_route("/test/raise", resource)

    async def run():
        async with testing.ASGIConductor(app) as conductor:
            return await conductor.simulate_get("/test/raise", headers=headers)
    return asyncio.run(run())


class Raising:
    def __init__(self, ex):
        self.ex = ex

    async def on_get(self, req, resp):
        raise self.ex


def test_unexpected_exception_is_json_500_logged_with_request_id():
    records = []

    class Collect(__import__("logging").Handler):
        def emit(self, record):
            records.append(record)

    import logging

    from api.middleware import RequestIdFilter
    handler = Collect()
    handler.addFilter(RequestIdFilter())
    logger = logging.getLogger("api.errors")
    logger.addHandler(handler)
    try:
        resp = _request_through_app(Raising(RuntimeError("kaboom at /secret/path")),
                                    headers={"X-Request-ID": "req-500-test"})
    finally:
        logger.removeHandler(handler)
    assert resp.status_code == 500
    assert set(resp.json) == {"title", "description", "code"}
    assert resp.json["code"] == "internal_error"
    assert "kaboom" not in resp.text and "Traceback" not in resp.text
    assert "req-500-test" in resp.json["description"]
    assert resp.headers["x-request-id"] == "req-500-test"
    errors_logged = [r for r in records if r.levelno >= logging.ERROR]
    assert errors_logged and errors_logged[0].request_id == "req-500-test"
    assert errors_logged[0].exc_info is not None  # the traceback goes to the log


def test_domain_error_raised_by_a_responder():
    resp = _request_through_app(Raising(errors.JobNotFound(7)))
    assert resp.status_code == 404
    assert resp.json == {"title": "404 Not Found", "description": "no job with id 7", "code": "job_not_found"}
