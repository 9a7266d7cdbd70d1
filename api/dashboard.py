"""GET /dashboard: the operations page, and the two admin endpoints only it needs.

    GET /dashboard                       the page (api/static/dashboard.html)
    GET /dashboard/static/{name}         its script and stylesheet (served from api/static;
                                         no CDN, no build step)
    GET /api/admin/throughput?window=900&bucket=10
                                         jobs that reached a final state per time bucket
    GET /api/admin/reports/latest        the newest succeeded payments report with its result

The page itself is public (it holds no data); everything it shows comes from the admin
API (Bearer ADMIN_TOKEN, see api/auth.py, which also guards the two endpoints here since
they live under /api/admin) and the report API v2. With ADMIN_TOKEN set the page asks for
the token once per browser session (sessionStorage) and sends it as a Bearer header;
wrong or missing, the data calls answer 401 and the page says so and shows nothing.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import falcon
from psycopg.rows import dict_row

from jobrunner import errors
from jobrunner.sqlfile import queries

from .auth import ADMIN_SCHEME
from .openapi import error_responses, json_response
from .report_jobs import KIND as REPORT_KIND

STATIC_DIR = Path(__file__).with_name("static")
# name -> content type; nothing else under api/static is served.
ASSETS = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
PAGE = "dashboard.html"

# The page loads only its own files and talks only to this server.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

DEFAULT_WINDOW, MAX_WINDOW = 900, 6 * 3600
DEFAULT_BUCKET, MIN_BUCKET, MAX_BUCKETS = 10, 1, 720


class _File:
    def __init__(self, path: Path, content_type: str) -> None:
        self.data = path.read_bytes()
        self.content_type = content_type
        self.etag = '"' + hashlib.sha256(self.data).hexdigest()[:16] + '"'

    def send(self, req: falcon.Request, resp: falcon.Response, cache: str) -> None:
        resp.set_header("ETag", self.etag)
        resp.cache_control = [cache]
        resp.set_header("X-Content-Type-Options", "nosniff")
        if req.get_header("If-None-Match") == self.etag:
            resp.status = falcon.HTTP_304
            return
        resp.content_type = self.content_type
        resp.data = self.data


class DashboardPage:
    def __init__(self) -> None:
        self.page = _File(STATIC_DIR / PAGE, "text/html; charset=utf-8")

    async def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.set_header("Content-Security-Policy", CSP)
        resp.set_header("Referrer-Policy", "no-referrer")
        self.page.send(req, resp, "no-cache")


class DashboardAsset:
    def __init__(self) -> None:
        self.files = {name: _File(STATIC_DIR / name, ctype) for name, ctype in ASSETS.items()}

    async def on_get(self, req: falcon.Request, resp: falcon.Response, name: str) -> None:
        file = self.files.get(name)
        if file is None:
            raise falcon.HTTPNotFound(description=f"No dashboard file named {name!r}.")
        # The page revalidates (cheap 304s), so a new version is picked up at once.
        file.send(req, resp, "no-cache")


def _seconds_param(req: falcon.Request, name: str, default: int, low: int, high: int) -> int:
    text = req.params.get(name)
    if text is None:
        return default
    if not isinstance(text, str) or not text.isascii() or not text.isdigit() or len(text) > 6:
        raise errors.InvalidInput(f"{name} must be a whole number of seconds")
    value = int(text)
    if not low <= value <= high:
        raise errors.InvalidInput(f"{name} must be from {low} to {high} seconds")
    return value


class Throughput:
    def __init__(self, context) -> None:
        self.db = context.db

    async def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        unknown = sorted(set(req.params) - {"window", "bucket"})
        if unknown:
            raise errors.InvalidInput(f"unknown query parameter(s): {', '.join(unknown)}; "
                                      "known: window, bucket")
        window = _seconds_param(req, "window", DEFAULT_WINDOW, 60, MAX_WINDOW)
        bucket = _seconds_param(req, "bucket", DEFAULT_BUCKET, MIN_BUCKET, 3600)
        if window // bucket > MAX_BUCKETS:
            raise errors.InvalidInput(f"at most {MAX_BUCKETS} buckets: raise bucket or lower window")
        async with self.db.connection() as conn:
            async with conn.cursor(row_factory=dict_row) as cur:
                await cur.execute(queries("dashboard")["throughput"],
                                  {"window": window, "bucket": bucket})
                rows = await cur.fetchall()
        resp.media = {"data": {
            "window_seconds": window,
            "bucket_seconds": bucket,
            "buckets": [{"at": r["bucket"].isoformat(), "succeeded": r["succeeded"],
                         "dead": r["dead"], "cancelled": r["cancelled"]} for r in rows],
        }}


class LatestReport:
    def __init__(self, context) -> None:
        self.db = context.db

    async def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        async with self.db.connection() as conn:
            async with conn.cursor(row_factory=dict_row) as cur:
                await cur.execute(queries("dashboard")["latest_report"], {"kind": REPORT_KIND})
                row = await cur.fetchone()
        resp.content_type = falcon.MEDIA_JSON
        if row is None:
            resp.data = b'{"data":null}'
            return
        head = (f'{{"data":{{"job_id":{int(row["id"])},'
                f'"finished_at":"{row["finished_at"].isoformat()}",'
                f'"attempts":{int(row["attempts"])},"result":')
        # The stored result is spliced in unparsed (it can be large).
        resp.data = (head + (row["result_json"] or "null") + "}}").encode()


# --- OpenAPI -----------------------------------------------------------------------------

_SECURITY = [{ADMIN_SCHEME: []}]

OPENAPI = {
    "tags": [{"name": "dashboard", "description": "The operations page and its data."}],
    "components": {
        "schemas": {
            "Throughput": {
                "type": "object", "required": ["data"], "additionalProperties": False,
                "properties": {"data": {
                    "type": "object", "additionalProperties": False,
                    "required": ["window_seconds", "bucket_seconds", "buckets"],
                    "properties": {
                        "window_seconds": {"type": "integer"},
                        "bucket_seconds": {"type": "integer"},
                        "buckets": {"type": "array", "items": {
                            "type": "object", "additionalProperties": False,
                            "required": ["at", "succeeded", "dead", "cancelled"],
                            "properties": {
                                "at": {"type": "string", "format": "date-time",
                                       "description": "start of the bucket"},
                                "succeeded": {"type": "integer", "minimum": 0},
                                "dead": {"type": "integer", "minimum": 0},
                                "cancelled": {"type": "integer", "minimum": 0},
                            },
                        }},
                    },
                }},
            },
            "LatestReport": {
                "type": "object", "required": ["data"], "additionalProperties": False,
                "properties": {"data": {
                    "oneOf": [
                        {"type": "null", "description": "no report has succeeded yet"},
                        {"type": "object", "additionalProperties": False,
                         "required": ["job_id", "finished_at", "attempts", "result"],
                         "properties": {
                             "job_id": {"type": "integer"},
                             "finished_at": {"type": "string", "format": "date-time"},
                             "attempts": {"type": "integer", "minimum": 1},
                             "result": {
                                 "type": "object", "required": ["data"],
                                 "properties": {"data": {"type": "array", "items": {
                                     "type": "object", "required": ["user_id", "total_payment"],
                                     "properties": {"user_id": {"type": "integer"},
                                                    "total_payment": {"type": "integer"}},
                                 }}},
                             },
                         }},
                    ],
                }},
            },
        },
    },
    "paths": {
        "/dashboard": {
            "get": {
                "operationId": "getDashboard",
                "tags": ["dashboard"],
                "summary": "The operations dashboard (an HTML page; its data calls need the "
                           "admin token).",
                "responses": {
                    "200": {"description": "The page.",
                            "headers": {"X-Request-ID": {"$ref": "#/components/headers/X-Request-ID"}},
                            "content": {"text/html": {"schema": {"type": "string"}}}},
                    "304": {"description": "Not modified (ETag)."},
                    **error_responses(),
                },
            },
        },
        "/dashboard/static/{name}": {
            "get": {
                "operationId": "getDashboardAsset",
                "tags": ["dashboard"],
                "summary": "The dashboard's script and stylesheet.",
                "parameters": [{"name": "name", "in": "path", "required": True,
                                "schema": {"type": "string", "enum": sorted(ASSETS)}}],
                "responses": {
                    "200": {"description": "The file.",
                            "headers": {"X-Request-ID": {"$ref": "#/components/headers/X-Request-ID"}},
                            "content": {"text/javascript": {"schema": {"type": "string"}},
                                        "text/css": {"schema": {"type": "string"}}}},
                    "304": {"description": "Not modified (ETag)."},
                    **error_responses(404),
                },
            },
        },
        "/api/admin/throughput": {
            "get": {
                "operationId": "getAdminThroughput",
                "tags": ["admin", "dashboard"],
                "summary": "Jobs that reached a final state (succeeded, dead, cancelled) per "
                           "time bucket, oldest first; empty buckets as zeros.",
                "security": _SECURITY,
                "parameters": [
                    {"name": "window", "in": "query", "required": False,
                     "description": f"seconds to look back (60..{MAX_WINDOW}, default {DEFAULT_WINDOW})",
                     "schema": {"type": "string", "pattern": "^[0-9]+$"}},
                    {"name": "bucket", "in": "query", "required": False,
                     "description": f"seconds per bucket (1..3600, default {DEFAULT_BUCKET}; "
                                    f"at most {MAX_BUCKETS} buckets)",
                     "schema": {"type": "string", "pattern": "^[0-9]+$"}},
                ],
                "responses": {
                    "200": json_response("The buckets.", {"$ref": "#/components/schemas/Throughput"}),
                    **error_responses(400, 401, 404, 503),
                },
            },
        },
        "/api/admin/reports/latest": {
            "get": {
                "operationId": "getAdminLatestReport",
                "tags": ["admin", "dashboard"],
                "summary": "The newest succeeded payments report and its result (null when "
                           "none has succeeded).",
                "security": _SECURITY,
                "responses": {
                    "200": json_response("The report.", {"$ref": "#/components/schemas/LatestReport"}),
                    **error_responses(401, 404, 503),
                },
            },
        },
    },
}


def install(app, context) -> None:
    app.add_route("/dashboard", DashboardPage())
    app.add_route("/dashboard/static/{name}", DashboardAsset())
    app.add_route("/api/admin/throughput", Throughput(context))
    app.add_route("/api/admin/reports/latest", LatestReport(context))
