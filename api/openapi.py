"""The OpenAPI 3.1 document of the whole API, served at GET /openapi.json.

Each resource module declares its own part as a module-level `OPENAPI` dict
(`{"paths": {...}, "components": {"schemas": {...}}}`); `build()` merges the parts of
every module listed in api/app.py (MODULES) onto BASE, refusing duplicates. Shared
pieces (the Error schema, common error responses, the request-id header) live here and
are referenced with `$ref`; `error_responses(400, 404, ...)` spells an operation's error
responses in one call. tests/e2e/test_openapi.py validates real responses against the
served document, so a route without its entry, or an entry that lies, fails a test.
"""
from __future__ import annotations

import copy
import http
from typing import Iterable

import falcon

SCHEMA_DIALECT = "https://spec.openapis.org/oas/3.1/dialect/base"

BASE: dict = {
    "openapi": "3.1.0",
    "jsonSchemaDialect": SCHEMA_DIALECT,
    "info": {
        "title": "jobrunner payments reports",
        "version": "1.0.0",
        "description": (
            "Per-user payment totals of the shop's orders: synchronously (v1) or as a "
            "queued job the client can long-poll (v2). Every error answers the Error "
            "schema; every response carries X-Request-ID."
        ),
    },
    "paths": {},
    "components": {
        "schemas": {
            "Error": {
                "type": "object",
                "description": "The one error format of the API.",
                "required": ["title", "description", "code"],
                "additionalProperties": False,
                "properties": {
                    "title": {"type": "string", "description": "HTTP status phrase"},
                    "description": {"type": "string", "description": "what went wrong, for people"},
                    "code": {"type": "string", "pattern": "^[a-z0-9_]+$",
                             "description": "stable machine-readable error code"},
                },
            },
        },
        "headers": {
            "X-Request-ID": {
                "description": "The request id: the client's when sane, else generated.",
                "schema": {"type": "string"},
            },
            "Retry-After": {
                "description": "Seconds to wait before retrying.",
                "schema": {"type": "string", "pattern": "^[0-9]+$"},
            },
        },
        "parameters": {
            "X-Request-ID": {
                "name": "X-Request-ID", "in": "header", "required": False,
                "description": "Optional request id (1..128 of letters, digits, `._:-`); "
                               "replaced by a generated one when not sane.",
                "schema": {"type": "string"},
            },
        },
        "responses": {},
    },
}

# Error responses shared by operations: status -> description.
_ERROR_DESCRIPTIONS = {
    400: "Invalid input.",
    401: "Missing or wrong bearer token (WWW-Authenticate names the scheme).",
    404: "Not found.",
    405: "Method not allowed (the Allow header lists the allowed ones).",
    409: "Conflict with the current state.",
    500: "Unexpected server error (details are logged with the request id).",
    503: "The database is unreachable or not migrated; retry after Retry-After seconds.",
}


def _error_response(status: int) -> dict:
    headers = {"X-Request-ID": {"$ref": "#/components/headers/X-Request-ID"}}
    if status == 503:
        headers["Retry-After"] = {"$ref": "#/components/headers/Retry-After"}
    if status == 405:
        headers["Allow"] = {"description": "Allowed methods.", "schema": {"type": "string"}}
    if status == 401:
        headers["WWW-Authenticate"] = {"description": "The authentication scheme: Bearer.",
                                       "schema": {"type": "string"}}
    return {
        "description": _ERROR_DESCRIPTIONS.get(status, http.HTTPStatus(status).phrase),
        "headers": headers,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


for _status in _ERROR_DESCRIPTIONS:
    BASE["components"]["responses"][http.HTTPStatus(_status).phrase.replace(" ", "")] = _error_response(_status)


def error_responses(*statuses: int) -> dict:
    """`{"404": {"$ref": ...}, ...}` for an operation's `responses`; 500 is always added."""
    out = {}
    for status in sorted(set(statuses) | {500}):
        name = http.HTTPStatus(status).phrase.replace(" ", "")
        if name not in BASE["components"]["responses"]:
            raise KeyError(f"no shared error response for {status}; add it to _ERROR_DESCRIPTIONS")
        out[str(status)] = {"$ref": f"#/components/responses/{name}"}
    return out


def json_response(description: str, schema: dict, headers: dict | None = None) -> dict:
    """A JSON success response with the X-Request-ID header."""
    all_headers = {"X-Request-ID": {"$ref": "#/components/headers/X-Request-ID"}}
    all_headers.update(headers or {})
    return {"description": description, "headers": all_headers,
            "content": {"application/json": {"schema": schema}}}


def merge(base: dict, part: dict, source: str = "?") -> dict:
    """Merge `part` (paths, components) into `base` in place; duplicates are errors."""
    for path, operations in part.get("paths", {}).items():
        target = base["paths"].setdefault(path, {})
        for method, operation in operations.items():
            if method in target:
                raise ValueError(f"OpenAPI: {method.upper()} {path} declared twice ({source})")
            target[method] = operation
    for section, entries in part.get("components", {}).items():
        target = base["components"].setdefault(section, {})
        for name, entry in entries.items():
            if name in target and target[name] != entry:
                raise ValueError(f"OpenAPI: components/{section}/{name} declared twice ({source})")
            target[name] = entry
    for tag in part.get("tags", []):
        base.setdefault("tags", []).append(tag)
    return base


def build(modules: Iterable) -> dict:
    """BASE plus the `OPENAPI` part of every module (those without one are skipped)."""
    document = copy.deepcopy(BASE)
    for module in modules:
        part = getattr(module, "OPENAPI", None)
        if part:
            merge(document, copy.deepcopy(part), getattr(module, "__name__", "?"))
    # Every operation accepts the request-id header.
    for operations in document["paths"].values():
        for operation in operations.values():
            params = operation.setdefault("parameters", [])
            ref = {"$ref": "#/components/parameters/X-Request-ID"}
            if ref not in params:
                params.append(ref)
    return document


class OpenAPIDocument:
    """GET /openapi.json: the document, built once per process."""

    def __init__(self, document: dict) -> None:
        self.document = document

    async def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = self.document


OPENAPI = {
    "paths": {
        "/openapi.json": {
            "get": {
                "operationId": "getOpenAPI",
                "tags": ["operations"],
                "summary": "This OpenAPI 3.1 document.",
                "responses": {
                    "200": json_response("The OpenAPI document.", {"type": "object"}),
                    **error_responses(),
                },
            },
        },
    },
}


def install(app, context) -> None:
    app.add_route("/openapi.json", OpenAPIDocument(context.openapi))
