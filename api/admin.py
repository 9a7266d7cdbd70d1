"""The admin API: inspect and repair jobs over HTTP (Bearer ADMIN_TOKEN, see api/auth.py).

    GET  /api/admin/jobs?state=&queue=&kind=&limit=50&after=<id>  {"data": [job...], "next": id|null}
    GET  /api/admin/jobs/{job_id}                                 {"data": job}
    POST /api/admin/jobs/{job_id}/retry                           {"data": job}  dead/failed -> queued
    POST /api/admin/jobs/{job_id}/cancel                          {"data": job}
    DELETE /api/admin/jobs/{job_id}                               {"data": job}  discard a finished job
    GET  /api/admin/stats                                         {"data": [{"queue", "state", "count",
                                                                             "oldest_age_seconds"}...]}

The repairs call the SQL functions of sql/004_failed_jobs.sql (the same ones psql and
the CLI use; they lock the job's row, so they are safe while workers run): an unknown id
is 404, a state that does not allow the change (e.g. retrying a running job) is 409.
Pages are keyset pages by id: pass `next` as `after` for the following page.
"""
from __future__ import annotations

import falcon
from psycopg.rows import dict_row

from jobrunner import admin, errors, queue
from jobrunner.sqlfile import queries

from .auth import ADMIN_SCHEME
from .openapi import error_responses, json_response

_Q = queries("admin")

JOBS_PATH = "/api/admin/jobs"
JOB_PATH = "/api/admin/jobs/{job_id}"
STATS_PATH = "/api/admin/stats"
LIST_PARAMS = ("state", "queue", "kind", "limit", "after")


def _int_param(req: falcon.Request, name: str, default: int) -> int:
    text = req.params.get(name)
    if text is None:
        return default
    if not isinstance(text, str) or not text.isascii() or not text.isdigit() or len(text) > 19:
        raise errors.InvalidInput(f"{name} must be a non-negative integer")
    return int(text)


def _str_param(req: falcon.Request, name: str) -> str | None:
    value = req.params.get(name)
    if isinstance(value, list):
        raise errors.InvalidInput(f"give {name} at most once")
    return value if value != "" else None


class AdminJobs:
    def __init__(self, context) -> None:
        self.db = context.db

    async def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        unknown = sorted(set(req.params) - set(LIST_PARAMS))
        if unknown:
            raise errors.InvalidInput(f"unknown query parameter(s): {', '.join(unknown)}; "
                                      f"known: {', '.join(LIST_PARAMS)}")
        for name in ("limit", "after"):
            if isinstance(req.params.get(name), list):
                raise errors.InvalidInput(f"give {name} at most once")
        params = admin.list_params(
            state=_str_param(req, "state"), queue_name=_str_param(req, "queue"),
            kind=_str_param(req, "kind"), limit=_int_param(req, "limit", admin.DEFAULT_LIMIT),
            after=_int_param(req, "after", 0))
        async with self.db.connection() as conn:
            async with conn.cursor(row_factory=dict_row) as cur:
                await cur.execute(_Q["list_jobs"], params)
                rows = await cur.fetchall()
        rows, next_after = admin.page(rows, params["limit"])
        resp.media = {"data": [admin.job_json(r) for r in rows], "next": next_after}


class AdminJob:
    """One job: read it, retry it, cancel it, discard it."""

    def __init__(self, context) -> None:
        self.db = context.db

    async def _call(self, query: str, job_id_text: str) -> dict:
        job_id = admin.check_job_id(job_id_text)
        async with self.db.connection() as conn:
            async with conn.cursor(row_factory=dict_row) as cur:
                with admin.sql_errors(job_id):
                    await cur.execute(_Q[query], {"id": job_id})
                    row = await cur.fetchone()
        if row is None:
            raise errors.JobNotFound(job_id)
        return {"data": admin.job_json(row)}

    async def on_get(self, req: falcon.Request, resp: falcon.Response, job_id: str) -> None:
        resp.media = await self._call("get", job_id)

    async def on_delete(self, req: falcon.Request, resp: falcon.Response, job_id: str) -> None:
        resp.media = await self._call("discard", job_id)

    async def on_post_retry(self, req: falcon.Request, resp: falcon.Response, job_id: str) -> None:
        resp.media = await self._call("retry", job_id)

    async def on_post_cancel(self, req: falcon.Request, resp: falcon.Response, job_id: str) -> None:
        resp.media = await self._call("cancel", job_id)


class AdminStats:
    def __init__(self, context) -> None:
        self.db = context.db

    async def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        async with self.db.connection() as conn:
            async with conn.cursor(row_factory=dict_row) as cur:
                await cur.execute(_Q["stats"])
                rows = await cur.fetchall()
        resp.media = {"data": [{**r, "oldest_age_seconds": float(r["oldest_age_seconds"])}
                               for r in rows]}


def install(app, context) -> None:
    jobs = AdminJob(context)
    app.add_route(JOBS_PATH, AdminJobs(context))
    app.add_route(JOB_PATH, jobs)
    app.add_route(JOB_PATH + "/retry", jobs, suffix="retry")
    app.add_route(JOB_PATH + "/cancel", jobs, suffix="cancel")
    app.add_route(STATS_PATH, AdminStats(context))


# --- OpenAPI -----------------------------------------------------------------------------

_SECURITY = [{ADMIN_SCHEME: []}]
_TIME = {"type": ["string", "null"], "format": "date-time"}
_JOB_ID = {
    "name": "job_id", "in": "path", "required": True,
    "description": "The job's id.", "schema": {"type": "string", "pattern": "^[0-9]+$"},
}


def _job_response(description: str) -> dict:
    return json_response(description, {"$ref": "#/components/schemas/AdminJobResponse"})


OPENAPI = {
    "tags": [{"name": "admin", "description": "Inspect and repair jobs (Bearer ADMIN_TOKEN; "
                                              "404 unless ADMIN_TOKEN is set)."}],
    "components": {
        "schemas": {
            "AdminJobError": {
                "type": "object",
                "description": "One failed attempt.",
                "required": ["attempt", "error_type", "message"],
                "properties": {
                    "attempt": {"type": "integer"},
                    "error_type": {"type": "string"},
                    "message": {"type": ["string", "null"]},
                    "traceback": {"type": ["string", "null"]},
                    "worker": {"type": ["string", "null"]},
                    "at": {"type": "string", "format": "date-time"},
                    "retry_at": {"type": ["string", "null"], "format": "date-time"},
                },
            },
            "AdminJob": {
                "type": "object",
                "required": list(admin.JOB_FIELDS),
                "additionalProperties": False,
                "properties": {
                    "id": {"type": "integer", "minimum": 1},
                    "queue": {"type": "string"},
                    "kind": {"type": "string"},
                    "args": {"description": "the job's JSON args"},
                    "state": {"type": "string", "enum": list(queue.STATES)},
                    "priority": {"type": "integer", "description": "lower runs first"},
                    "attempts": {"type": "integer", "minimum": 0},
                    "max_attempts": {"type": "integer", "minimum": 1},
                    "run_at": {"type": "string", "format": "date-time"},
                    "created_at": {"type": "string", "format": "date-time"},
                    "started_at": _TIME,
                    "finished_at": _TIME,
                    "last_error": {"type": ["string", "null"]},
                    "errors": {"type": "array", "items": {"$ref": "#/components/schemas/AdminJobError"},
                               "description": "one entry per failed attempt, oldest first"},
                    "worker_id": {"type": ["string", "null"]},
                },
            },
            "AdminJobResponse": {
                "type": "object", "required": ["data"], "additionalProperties": False,
                "properties": {"data": {"$ref": "#/components/schemas/AdminJob"}},
            },
            "AdminJobPage": {
                "type": "object", "required": ["data", "next"], "additionalProperties": False,
                "properties": {
                    "data": {"type": "array", "items": {"$ref": "#/components/schemas/AdminJob"}},
                    "next": {"type": ["integer", "null"],
                             "description": "pass as `after` for the next page; null on the last"},
                },
            },
            "QueueStat": {
                "type": "object", "additionalProperties": False,
                "required": ["queue", "state", "count", "oldest_age_seconds"],
                "properties": {
                    "queue": {"type": "string"},
                    "state": {"type": "string", "enum": list(queue.STATES)},
                    "count": {"type": "integer", "minimum": 1},
                    "oldest_age_seconds": {"type": "number",
                                           "description": "age of the oldest job (since created)"},
                },
            },
            "QueueStats": {
                "type": "object", "required": ["data"], "additionalProperties": False,
                "properties": {"data": {"type": "array", "items": {"$ref": "#/components/schemas/QueueStat"}}},
            },
        },
    },
    "paths": {
        JOBS_PATH: {
            "get": {
                "operationId": "adminListJobs", "tags": ["admin"], "security": _SECURITY,
                "summary": "Jobs by id, filtered, one keyset page at a time.",
                "parameters": [
                    {"name": "state", "in": "query", "required": False,
                     "schema": {"type": "string", "enum": list(queue.STATES)}},
                    {"name": "queue", "in": "query", "required": False,
                     "schema": {"type": "string", "minLength": 1, "maxLength": 200}},
                    {"name": "kind", "in": "query", "required": False,
                     "schema": {"type": "string", "minLength": 1, "maxLength": 200}},
                    {"name": "limit", "in": "query", "required": False,
                     "schema": {"type": "integer", "minimum": 1, "maximum": admin.MAX_LIMIT,
                                "default": admin.DEFAULT_LIMIT}},
                    {"name": "after", "in": "query", "required": False,
                     "description": "the `next` of the previous page",
                     "schema": {"type": "integer", "minimum": 0, "default": 0}},
                ],
                "responses": {
                    "200": json_response("A page of jobs.", {"$ref": "#/components/schemas/AdminJobPage"}),
                    **error_responses(400, 401, 404, 503),
                },
            },
        },
        JOB_PATH: {
            "get": {
                "operationId": "adminGetJob", "tags": ["admin"], "security": _SECURITY,
                "summary": "One job with its error history.",
                "parameters": [_JOB_ID],
                "responses": {"200": _job_response("The job."), **error_responses(400, 401, 404, 503)},
            },
            "delete": {
                "operationId": "adminDiscardJob", "tags": ["admin"], "security": _SECURITY,
                "summary": "Discard a finished job (succeeded, dead, cancelled) and its result.",
                "description": "409 for a job that is still active: cancel it first.",
                "parameters": [_JOB_ID],
                "responses": {"200": _job_response("The deleted job."),
                              **error_responses(400, 401, 404, 409, 503)},
            },
        },
        JOB_PATH + "/retry": {
            "post": {
                "operationId": "adminRetryJob", "tags": ["admin"], "security": _SECURITY,
                "summary": "Put a dead or failed job back to queued, runnable now.",
                "description": "Attempts and the error history are kept; a job that used up "
                               "its attempts gets one more (max_attempts = attempts + 1). "
                               "409 for any other state (a running job stays with its worker).",
                "parameters": [_JOB_ID],
                "responses": {"200": _job_response("The job, queued."),
                              **error_responses(400, 401, 404, 409, 503)},
            },
        },
        JOB_PATH + "/cancel": {
            "post": {
                "operationId": "adminCancelJob", "tags": ["admin"], "security": _SECURITY,
                "summary": "Cancel a job.",
                "description": "Queued or failed: cancelled at once. Running: cancel requested "
                               "(the task stops cooperatively). Finished: unchanged.",
                "parameters": [_JOB_ID],
                "responses": {"200": _job_response("The job after the cancel."),
                              **error_responses(400, 401, 404, 503)},
            },
        },
        STATS_PATH: {
            "get": {
                "operationId": "adminQueueStats", "tags": ["admin"], "security": _SECURITY,
                "summary": "Jobs per queue and state, with the oldest one's age.",
                "responses": {"200": json_response("The counts.", {"$ref": "#/components/schemas/QueueStats"}),
                              **error_responses(401, 404, 503)},
            },
        },
    },
}
