"""Report API v2: the payments report as a queued job, with status, long-poll and cancel.

    POST /api/2.0/report/payments            submit (GET too, for clients of the first
                                             design): 202, Location, {"data": {job_id,
                                             status, status_url}}; Idempotency-Key honoured
    GET  /api/2.0/report/payments/{job_id}   the job; 200 when final, 202 + Retry-After
                                             while pending; ?wait=N long-polls (0 < N <= 60)
    DELETE /api/2.0/report/payments/{job_id} cancel; 200 with the job

Submitting joins the active report job if there is one (api/report_jobs.py). A
long-poll registers with the process's CompletionHub (api/completion.py) *before* it
reads the job, answers at once if the job is final, and otherwise waits, holding no
database connection, for the first of: the job's completion (dispatched by the hub's
one LISTEN connection), its deadline (then it reads the job again), the client going
away, or the process stopping (the hub answers every waiter with the current state).
"""
from __future__ import annotations

import asyncio
import logging

import falcon

from jobrunner import errors, metrics

from . import report_jobs
from .completion import WAKE, CompletionHub
from .openapi import error_responses, json_response
from .report_jobs import JobView

log = logging.getLogger("api.reports_v2")

SUBMIT_PATH = "/api/2.0/report/payments"
STATUS_PATH = "/api/2.0/report/payments/{job_id}"
PENDING_RETRY_AFTER = "1"   # seconds; a client may instead long-poll again at once


def _answer(resp: falcon.Response, view: JobView) -> None:
    if view.final:
        resp.status = falcon.HTTP_200
    else:
        resp.status = falcon.HTTP_202
        resp.set_header("Retry-After", PENDING_RETRY_AFTER)
    resp.content_type = falcon.MEDIA_JSON
    resp.data = view.body()


async def _client_gone(receive) -> None:
    """Returns when the ASGI server reports the client disconnected."""
    while True:
        event = await receive()
        if event.get("type") == "http.disconnect":
            return


class PaymentsReportJobs:
    """POST (and legacy GET) /api/2.0/report/payments: submit a report job."""

    def __init__(self, context) -> None:
        self.db = context.db

    async def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        key = report_jobs.check_idempotency_key(req.get_header("Idempotency-Key"))
        view = await report_jobs.submit(self.db, key)
        resp.status = falcon.HTTP_202
        resp.location = report_jobs.status_url(view.id)
        resp.media = {"data": view.summary()}

    on_get = on_post


class PaymentsReportJob:
    """GET / DELETE /api/2.0/report/payments/{job_id}."""

    def __init__(self, context, hub: CompletionHub) -> None:
        self.db = context.db
        self.hub = hub

    async def on_get(self, req: falcon.Request, resp: falcon.Response, job_id: str) -> None:
        job = report_jobs.parse_job_id(job_id)
        wait = report_jobs.parse_wait(req.get_param_as_list("wait"))
        if wait is None or self.hub.closed:
            view = await self._read(job)
        else:
            view = await self._long_poll(req, job, wait)
        _answer(resp, view)

    async def on_delete(self, req: falcon.Request, resp: falcon.Response, job_id: str) -> None:
        job = report_jobs.parse_job_id(job_id)
        view = await report_jobs.cancel(self.db, job)
        resp.content_type = falcon.MEDIA_JSON
        resp.data = view.body()

    async def _read(self, job_id: int) -> JobView:
        """The job now (reads of many requests share one query); 404 if unknown."""
        view = await self.hub.read(job_id)
        if view is None:
            raise errors.JobNotFound(job_id)
        return view

    async def _long_poll(self, req: falcon.Request, job_id: int, wait: float) -> JobView:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        future = self.hub.register(job_id)   # first: a completion from now on is seen
        disconnect = None
        metrics.LONGPOLL_WAITERS.inc()
        try:
            view = await self._read(job_id)
            if view.final:
                return view
            # The ASGI receive channel yields what is left of the body (nothing, for a
            # well-behaved GET), then http.disconnect when the client goes away. Falcon
            # keeps the channel on the request.
            receive = getattr(req, "_receive", None)
            watched = {future}
            if receive is not None:
                disconnect = asyncio.ensure_future(_client_gone(receive))
                watched.add(disconnect)
            await asyncio.wait(watched, timeout=max(0.0, deadline - loop.time()),
                               return_when=asyncio.FIRST_COMPLETED)
            if future.done():
                result = future.result()
                if result is not WAKE:
                    return result
            elif disconnect is not None and disconnect.done():
                log.debug("long-poll of job %d: client went away", job_id)
                return view           # nobody reads the answer
            # The deadline (or a wake-up): the job as it is now.
            return await self._read(job_id)
        finally:
            metrics.LONGPOLL_WAITERS.dec()
            self.hub.discard(job_id, future)
            if disconnect is not None:
                if not disconnect.done():
                    disconnect.cancel()
                elif not disconnect.cancelled() and disconnect.exception() is not None:
                    log.debug("long-poll of job %d: receive failed: %r", job_id, disconnect.exception())


# --- OpenAPI -------------------------------------------------------------------------

_JOB_ID_PARAM = {
    "name": "job_id", "in": "path", "required": True,
    "description": "The job id (a positive integer); anything else answers 400.",
    "schema": {"type": "string", "pattern": "^[0-9]{1,19}$"},
}
_TIMESTAMP = {"type": ["string", "null"], "format": "date-time"}
_STATES = ["queued", "running", "succeeded", "failed", "dead", "cancelled"]

# POST and the legacy GET submit answer alike.
_SUBMIT_RESPONSES = {
    "202": json_response("The job (new, joined, or the Idempotency-Key's).",
                         {"$ref": "#/components/schemas/ReportJobSubmitted"},
                         {"Location": {"description": "The job's status URL.",
                                       "schema": {"type": "string"}}}),
    **error_responses(400, 409, 503),
}

OPENAPI = {
    "tags": [{"name": "report jobs", "description": "The payments report as a queued job (v2)."}],
    "components": {
        "schemas": {
            "JobStatusValue": {
                "type": "string", "enum": _STATES,
                "description": "queued: waiting for a worker; running: a worker has it; "
                               "failed: an attempt failed, a retry is scheduled; succeeded, "
                               "dead (attempts exhausted or a permanent error) and cancelled "
                               "are final.",
            },
            "ReportJobSubmitted": {
                "type": "object", "required": ["data"], "additionalProperties": False,
                "properties": {"data": {
                    "type": "object", "required": ["job_id", "status", "status_url"],
                    "additionalProperties": False,
                    "properties": {
                        "job_id": {"type": "integer", "minimum": 1},
                        "status": {"$ref": "#/components/schemas/JobStatusValue"},
                        "status_url": {"type": "string", "pattern": "^/api/2\\.0/report/payments/[0-9]+$"},
                    },
                }},
            },
            "ReportJob": {
                "type": "object",
                "required": ["job_id", "status", "attempts", "max_attempts", "created_at",
                             "started_at", "finished_at", "last_error", "cancel_requested",
                             "status_url"],
                "additionalProperties": False,
                "properties": {
                    "job_id": {"type": "integer", "minimum": 1},
                    "status": {"$ref": "#/components/schemas/JobStatusValue"},
                    "attempts": {"type": "integer", "minimum": 0,
                                 "description": "attempts started so far"},
                    "max_attempts": {"type": "integer", "minimum": 1},
                    "created_at": {"type": "string", "format": "date-time"},
                    "started_at": {**_TIMESTAMP, "description": "start of the latest attempt"},
                    "finished_at": {**_TIMESTAMP, "description": "set once the job is final"},
                    "last_error": {"type": ["string", "null"],
                                   "description": "the error of the latest failed attempt"},
                    "cancel_requested": {"type": "boolean"},
                    "status_url": {"type": "string", "pattern": "^/api/2\\.0/report/payments/[0-9]+$"},
                    "result": {
                        "$ref": "#/components/schemas/PaymentsReport",
                        "description": "Present only when status is succeeded: exactly the "
                                       "v1 report.",
                    },
                },
                "if": {"properties": {"status": {"const": "succeeded"}}},
                "then": {"required": ["result"]},
                "else": {"not": {"required": ["result"]}},
            },
            "ReportJobStatus": {
                "type": "object", "required": ["data"], "additionalProperties": False,
                "properties": {"data": {"$ref": "#/components/schemas/ReportJob"}},
            },
        },
        "parameters": {
            "Idempotency-Key": {
                "name": "Idempotency-Key", "in": "header", "required": False,
                "description": "Requests with the same key always get the same job, even "
                               "after it finished (1 to 255 of letters, digits, `._:+/=-`; "
                               "anything else answers 400).",
                "schema": {"type": "string", "pattern": "^[A-Za-z0-9._:+/=\\-]{1,255}$"},
            },
        },
    },
    "paths": {
        SUBMIT_PATH: {
            "post": {
                "operationId": "submitPaymentsReportJob",
                "tags": ["report jobs"],
                "summary": "Submit a payments report job; answers at once.",
                "description": "While an identical report job is queued or running, that job "
                               "is returned instead of a new one (also under concurrent "
                               "submits). Follow `Location` / `status_url`, e.g. with "
                               "`?wait=30`.",
                "parameters": [{"$ref": "#/components/parameters/Idempotency-Key"}],
                "responses": _SUBMIT_RESPONSES,
            },
            "get": {
                "operationId": "submitPaymentsReportJobLegacy",
                "tags": ["report jobs"],
                "summary": "Submit a payments report job (as POST; for older clients).",
                "parameters": [{"$ref": "#/components/parameters/Idempotency-Key"}],
                "responses": _SUBMIT_RESPONSES,
            },
        },
        STATUS_PATH: {
            "get": {
                "operationId": "getPaymentsReportJob",
                "tags": ["report jobs"],
                "summary": "The job's status, and its result once it succeeded.",
                "description": "With `wait`, the request is held until the job is final or "
                               "`wait` seconds passed, whichever comes first, and answered at "
                               "once if the job is final already (or the server is stopping).",
                "parameters": [
                    _JOB_ID_PARAM,
                    {"name": "wait", "in": "query", "required": False,
                     "description": "Long-poll for up to this many seconds (0 < wait <= 60); "
                                    "anything else answers 400.",
                     "schema": {"type": "number", "exclusiveMinimum": 0, "maximum": 60}},
                ],
                "responses": {
                    "200": json_response("The job is final (succeeded, dead or cancelled).",
                                         {"$ref": "#/components/schemas/ReportJobStatus"}),
                    "202": json_response("The job is not final yet (queued, running, failed); "
                                         "ask again.",
                                         {"$ref": "#/components/schemas/ReportJobStatus"},
                                         {"Retry-After": {"$ref": "#/components/headers/Retry-After"}}),
                    **error_responses(400, 404, 503),
                },
            },
            "delete": {
                "operationId": "cancelPaymentsReportJob",
                "tags": ["report jobs"],
                "summary": "Cancel the job: queued -> cancelled; running -> cancel requested "
                           "(the worker stops it); finished jobs are left as they are.",
                "parameters": [_JOB_ID_PARAM],
                "responses": {
                    "200": json_response("The job after the cancel request.",
                                         {"$ref": "#/components/schemas/ReportJobStatus"}),
                    **error_responses(400, 404, 503),
                },
            },
        },
    },
}


def install(app, context) -> None:
    hub = CompletionHub(lambda: context.db.url,
                        lambda ids: report_jobs.read_jobs(context.db, ids))

    async def start() -> None:
        await hub.start(context.shutting_down)

    context.on_startup.append(start)
    context.on_shutdown.append(hub.stop)
    app.add_route(SUBMIT_PATH, PaymentsReportJobs(context))
    app.add_route(STATUS_PATH, PaymentsReportJob(context, hub))
