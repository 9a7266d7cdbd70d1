"""Operations endpoints: GET /healthz (process alive), GET /readyz (ready to serve).

/healthz touches nothing but the event loop: a load balancer may restart the process
when it fails. /readyz answers 200 only when the database is reachable and every
migration this code ships is applied; otherwise 503 in the error format (code
`database_unavailable` or `migrations_pending`) with Retry-After, so traffic is held
back without restarting anything.
"""
from __future__ import annotations

import falcon

from jobrunner import errors
from jobrunner.migrate import available
from jobrunner.sqlfile import queries

from .openapi import error_responses, json_response

READY_TIMEOUT = 2.0  # seconds to wait for a pooled connection before answering 503


class Healthz:
    async def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"status": "ok"}


class Readyz:
    def __init__(self, context) -> None:
        self.db = context.db
        self.expected = [m.version for m in available()]

    async def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        sql = queries("health")
        async with self.db.connection(timeout=READY_TIMEOUT) as conn:
            await conn.execute(sql["ping"])
            cur = await conn.execute(sql["migrations_table_exists"])
            exists = (await cur.fetchone())[0]
            applied: set[int] = set()
            if exists:
                cur = await conn.execute(sql["applied_migrations"])
                applied = {row[0] for row in await cur.fetchall()}
        pending = [v for v in self.expected if v not in applied]
        if pending:
            raise errors.MigrationsPending(
                f"{len(pending)} migration(s) pending: {', '.join(f'{v:03d}' for v in pending)}; run `make migrate`")
        resp.media = {"status": "ready", "schema_version": max(applied) if applied else 0}


OPENAPI = {
    "tags": [{"name": "operations", "description": "Liveness, readiness, this document."}],
    "paths": {
        "/healthz": {
            "get": {
                "operationId": "getHealthz",
                "tags": ["operations"],
                "summary": "The process is alive (touches no database).",
                "responses": {
                    "200": json_response("Alive.", {
                        "type": "object", "required": ["status"], "additionalProperties": False,
                        "properties": {"status": {"const": "ok"}},
                    }),
                    **error_responses(),
                },
            },
        },
        "/readyz": {
            "get": {
                "operationId": "getReadyz",
                "tags": ["operations"],
                "summary": "The database is reachable and fully migrated.",
                "responses": {
                    "200": json_response("Ready.", {
                        "type": "object", "required": ["status", "schema_version"],
                        "additionalProperties": False,
                        "properties": {
                            "status": {"const": "ready"},
                            "schema_version": {"type": "integer", "minimum": 0,
                                               "description": "highest applied migration"},
                        },
                    }),
                    **error_responses(503),
                },
            },
        },
    },
}


def install(app, context) -> None:
    app.add_route("/healthz", Healthz())
    app.add_route("/readyz", Readyz(context))
