"""GET /metrics (Prometheus text format) and the middleware that counts API requests.

The metrics themselves are defined in jobrunner/metrics.py and documented in
docs/operations.md (Metrics). A scrape returns:
- the figures of every live API worker process (prometheus-client multiprocess mode,
  set up in gunicorn.conf.py), among them `api_requests_total` and
  `api_request_duration_seconds` counted by `RequestMetricsMiddleware` per route
  *template* (`/api/2.0/report/payments/{job_id}`, never the raw path, so the number of
  series stays bounded; requests matching no route count as `unmatched`);
- the queue-level figures, read from the database by one query at scrape time. When the
  database cannot be read the scrape still succeeds, with `jobrunner_queue_stats_up 0`.
"""
from __future__ import annotations

import asyncio
import logging
import time

import falcon
import psycopg

from jobrunner import errors, metrics
from jobrunner.sqlfile import queries

from .openapi import error_responses

log = logging.getLogger("api.metrics")

SCRAPE_DB_TIMEOUT = 2.0   # seconds to wait for a pooled connection during a scrape


class RequestMetricsMiddleware:
    async def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.metrics_started = time.perf_counter()

    async def process_response(self, req: falcon.Request, resp: falcon.Response,
                               resource: object, req_succeeded: bool) -> None:
        started = getattr(req.context, "metrics_started", None)
        if started is None:
            return
        route = req.uri_template or "unmatched"
        method = req.method if req.method in _METHODS else "other"
        metrics.API_REQUESTS.labels(method, route, str(resp.status_code)).inc()
        metrics.API_REQUEST_SECONDS.labels(method, route).observe(time.perf_counter() - started)


_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"))


class Metrics:
    def __init__(self, context) -> None:
        self.db = context.db

    async def _queue_rows(self):
        try:
            async with self.db.connection(timeout=SCRAPE_DB_TIMEOUT) as conn:
                cur = await conn.execute(queries("metrics")["queue_figures"])
                return await cur.fetchall()
        except (errors.DatabaseUnavailable, psycopg.Error) as exc:
            log.warning("metrics: queue figures unavailable (%s)", exc)
            return None

    async def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        rows = await self._queue_rows()
        # Reading the other processes' files is blocking I/O: keep it off the event loop.
        body, content_type = await asyncio.to_thread(metrics.exposition, rows)
        resp.data = body
        resp.content_type = content_type
        resp.cache_control = ["no-store"]


OPENAPI = {
    "paths": {
        "/metrics": {
            "get": {
                "operationId": "getMetrics",
                "tags": ["operations"],
                "summary": "Prometheus metrics: queue-level figures read from the database "
                           "at scrape time, and the API processes' own figures.",
                "description": "Text exposition format 0.0.4. Every series is documented in "
                               "docs/operations.md (Metrics).",
                "responses": {
                    "200": {
                        "description": "The metrics.",
                        "headers": {"X-Request-ID": {"$ref": "#/components/headers/X-Request-ID"}},
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    **error_responses(),
                },
            },
        },
    },
}


def install(app, context) -> None:
    app.add_middleware(RequestMetricsMiddleware())
    app.add_route("/metrics", Metrics(context))
