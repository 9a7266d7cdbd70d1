"""Builds the Falcon ASGI application served by gunicorn (`api.app:app`).

Adding an endpoint: write a module `api/<resource>.py` with
  - `install(app, context)`: `app.add_route(...)` its resources (they get `context.db`),
  - `OPENAPI`: its part of the OpenAPI document (paths, components),
then list the module in MODULES below. Errors: raise a jobrunner.errors exception (or a
falcon.HTTPError); api/errors.py maps it to the JSON error format.

Per worker process: the lifespan startup (after gunicorn's fork) opens the database
pool; the lifespan shutdown (after in-flight requests drained) closes it. Other
per-process services (e.g. a LISTEN connection) hook in the same way:
`context.on_startup.append(coro_fn)` / `context.on_shutdown.append(coro_fn)`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import falcon
import falcon.asgi

from . import errors, health, openapi, reports_v1
from .db import Database
from .middleware import RequestIdMiddleware, configure_logging

log = logging.getLogger("api.app")

# Every resource module, in the order their routes and OpenAPI parts are added.
MODULES = (health, reports_v1, openapi)


@dataclass
class AppContext:
    """What resources share within one process."""

    db: Database
    openapi: dict = field(default_factory=dict)
    on_startup: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    on_shutdown: list[Callable[[], Awaitable[None]]] = field(default_factory=list)


class Lifespan:
    """ASGI lifespan hooks, run in each worker process (after the fork)."""

    def __init__(self, context: AppContext) -> None:
        self.context = context

    async def process_startup(self, scope: dict, event: dict) -> None:
        await self.context.db.open()
        for hook in self.context.on_startup:
            await hook()
        log.info("API process ready")

    async def process_shutdown(self, scope: dict, event: dict) -> None:
        for hook in reversed(self.context.on_shutdown):
            try:
                await hook()
            except Exception:
                log.exception("shutdown hook %r failed", hook)
        await self.context.db.close()
        log.info("API process stopped")


def create_app(database_url: str | None = None) -> falcon.asgi.App:
    """The app; `database_url` defaults to jobrunner.db.database_url() at startup."""
    configure_logging()
    context = AppContext(db=Database(database_url))
    context.openapi = openapi.build(MODULES)
    app = falcon.asgi.App(middleware=[RequestIdMiddleware(), Lifespan(context)])
    app.req_options.strip_url_path_trailing_slash = True
    errors.install(app)
    for module in MODULES:
        module.install(app, context)
    return app


app = create_app()
