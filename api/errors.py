"""One error handler for the whole API, one JSON shape for every error.

Every error answers `{"title": ..., "description": ..., "code": ...}`: `title` and
`description` as Falcon emits them (the title defaults to the status line, e.g.
`404 Not Found`), `code` a stable machine-readable string. Sources:

- Falcon's own errors (404 unknown route, 405 wrong method with `Allow`, 400 bad media,
  and any `falcon.HTTPError` a responder raises): status, headers and texts are kept;
  `code` is `ex.code` when the raiser set one, else derived from the status
  (`not_found`, `method_not_allowed`, ...).
- Domain exceptions (jobrunner.errors): status from DOMAIN_STATUS (the nearest class in
  the exception's MRO wins), `code` from the exception class, `description` its message.
- Database driver errors meaning "cannot reach the database" (psycopg, the pool,
  asyncpg): 503 `database_unavailable` with `Retry-After`; a missing table: 503
  `database_not_migrated`.
- A value the database refuses (psycopg/asyncpg DataError, SQLSTATE class 22): 400
  `invalid_input`, a safety net behind the input checks.
- Anything else: 500 `internal_error`, the traceback logged (never sent) with the
  request id.

Every 5xx is logged with the request id (the logging filter adds it).
"""
from __future__ import annotations

import http
import logging
import re

import asyncpg.exceptions
import falcon
import falcon.asgi
import psycopg
import psycopg.errors
from psycopg_pool import PoolTimeout

from jobrunner import errors

log = logging.getLogger("api.errors")

RETRY_AFTER_SECONDS = 5

# Domain exception class -> HTTP status. Add a line for a new base class; subclasses of
# these (e.g. JobNotFound under NotFound) are mapped already.
DOMAIN_STATUS: dict[type[errors.JobrunnerError], int] = {
    errors.InvalidInput: 400,
    errors.NotFound: 404,
    errors.Conflict: 409,
    errors.DatabaseUnavailable: 503,
}

# Driver errors that mean the database cannot be reached right now.
UNREACHABLE: tuple[type[BaseException], ...] = (
    psycopg.OperationalError,
    PoolTimeout,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,   # admin shutdown, cannot connect now
    asyncpg.exceptions.InterfaceError,
    ConnectionError,
    TimeoutError,
)
# SQLSTATEs the failed-jobs SQL functions (sql/004_failed_jobs.sql) raise on purpose, for
# callers that run them without jobrunner.admin.sql_errors(): status and code.
SQL_FUNCTION_ERRORS: dict[type[BaseException], tuple[int, str]] = {
    psycopg.errors.NoDataFound: (404, errors.JobNotFound.code),           # P0002: no such job
    psycopg.errors.ObjectNotInPrerequisiteState: (409, errors.Conflict.code),  # 55000: wrong state
}
# A value the database refuses (NUL in text, out-of-range number or date, bad JSON text):
# the request's input, since everything stored comes from one.
BAD_DATA: tuple[type[BaseException], ...] = (
    psycopg.DataError,
    asyncpg.exceptions.DataError,
)
NOT_MIGRATED: tuple[type[BaseException], ...] = (
    psycopg.errors.UndefinedTable,
    asyncpg.exceptions.UndefinedTableError,
)


def _phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def status_line(status: int) -> str:
    """`404` -> `404 Not Found`: Falcon's default error title."""
    return falcon.code_to_http_status(status)


def code_for_status(status: int) -> str:
    """`404` -> `not_found`, `405` -> `method_not_allowed`, ..."""
    return re.sub(r"[^a-z0-9]+", "_", _phrase(status).lower()).strip("_") or "error"


def domain_status(ex: errors.JobrunnerError) -> int:
    for cls in type(ex).__mro__:
        if cls in DOMAIN_STATUS:
            return DOMAIN_STATUS[cls]
    return 500


def _default_description(req: falcon.Request, status: int, headers: dict) -> str:
    if status == 404:
        return f"Nothing is found at {req.path}."
    if status == 405:
        allowed = headers.get("Allow") or headers.get("allow") or ""
        return f"{req.method} is not allowed on {req.path}" + (f"; allowed: {allowed}." if allowed else ".")
    return _phrase(status) + "."


def describe(req: falcon.Request, ex: BaseException) -> tuple[int, dict, dict[str, str]]:
    """(status, body, extra headers) for an exception; pure, so unit-testable."""
    if isinstance(ex, falcon.HTTPError):
        status = ex.status_code
        headers = dict(ex.headers or {})
        body = {
            "title": ex.title or status_line(status),
            "description": ex.description or _default_description(req, status, headers),
            "code": str(ex.code) if ex.code is not None else code_for_status(status),
        }
        return status, body, headers
    if isinstance(ex, errors.JobrunnerError):
        status = domain_status(ex)
        headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if status == 503 else {}
        if status == 500:
            body = {"title": status_line(500), "description": "An unexpected error occurred.",
                    "code": "internal_error"}
        else:
            body = {"title": status_line(status), "description": str(ex) or _phrase(status) + ".",
                    "code": ex.code}
        return status, body, headers
    for cls, (status, code) in SQL_FUNCTION_ERRORS.items():
        if isinstance(ex, cls):
            diag = getattr(ex, "diag", None)
            message = (diag.message_primary if diag is not None else None) or _phrase(status) + "."
            return status, {"title": status_line(status), "description": message, "code": code}, {}
    if isinstance(ex, BAD_DATA):
        return 400, {"title": status_line(400),
                     "description": "The database refused a value of the request as invalid.",
                     "code": errors.InvalidInput.code}, {}
    if isinstance(ex, NOT_MIGRATED):
        return 503, {"title": status_line(503),
                     "description": "The database schema is not migrated yet.",
                     "code": "database_not_migrated"}, {"Retry-After": str(RETRY_AFTER_SECONDS)}
    if isinstance(ex, UNREACHABLE):
        return 503, {"title": status_line(503),
                     "description": "The database cannot be reached right now; retry later.",
                     "code": errors.DatabaseUnavailable.code}, {"Retry-After": str(RETRY_AFTER_SECONDS)}
    return 500, {"title": status_line(500), "description": "An unexpected error occurred.",
                 "code": "internal_error"}, {}


async def handle_error(req: falcon.Request, resp: falcon.Response, ex: BaseException, params: dict) -> None:
    """The API's only error handler (registered for Exception and falcon.HTTPError)."""
    status, body, headers = describe(req, ex)
    if status == 500:
        log.error("%s %s failed: %s", req.method, req.path, ex.__class__.__name__, exc_info=ex)
        request_id = getattr(req.context, "request_id", None)
        if request_id:
            body["description"] += f" Request id: {request_id}."
    elif status >= 500:
        log.warning("%s %s -> %d %s: %s", req.method, req.path, status, body["code"], ex)
    resp.status = status
    resp.set_headers(headers)
    resp.content_type = falcon.MEDIA_JSON
    resp.media = body


def install(app: falcon.asgi.App) -> None:
    app.add_error_handler(Exception, handle_error)
    app.add_error_handler(falcon.HTTPError, handle_error)
