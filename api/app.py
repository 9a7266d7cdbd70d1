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

Shutdown: gunicorn's ASGI worker drains in-flight requests on SIGTERM (up to
graceful_timeout) and only then runs the lifespan shutdown. Long-running requests
(long-polls) learn of the SIGTERM earlier through `context.shutting_down`, an
asyncio.Event set as soon as the signal arrives, so they can answer at once.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import signal
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import falcon
import falcon.asgi

from . import admin, auth, dashboard, errors, health, metrics, openapi, reports_v1, reports_v2
from .db import Database
from .middleware import RequestIdMiddleware, configure_logging

log = logging.getLogger("api.app")

# Every resource module, in the order their routes and OpenAPI parts are added.
MODULES = (health, reports_v1, reports_v2, metrics, admin, dashboard, auth, openapi)


@dataclass
class AppContext:
    """What resources share within one process."""

    db: Database
    openapi: dict = field(default_factory=dict)
    on_startup: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    on_shutdown: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    # Set when the process is asked to stop (SIGTERM/SIGINT/SIGQUIT) or shuts down.
    shutting_down: asyncio.Event = field(default_factory=asyncio.Event)


class Lifespan:
    """ASGI lifespan hooks, run in each worker process (after the fork)."""

    def __init__(self, context: AppContext) -> None:
        self.context = context

    def _watch_stop_signals(self) -> None:
        """Chain a handler that sets `shutting_down` before the server's own handler.

        gunicorn's worker registers its handlers on the event loop; asyncio keeps one
        handler per signal, so ours calls the previous one. Where there is none (tests,
        other servers) nothing is changed.
        """
        loop = asyncio.get_running_loop()
        handlers = getattr(loop, "_signal_handlers", None)
        if not isinstance(handlers, dict):
            return
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            previous = handlers.get(signum)
            if previous is None:
                continue

            def on_signal(previous=previous, signum=signum) -> None:
                if not self.context.shutting_down.is_set():
                    log.info("%s received: stopping", signal.Signals(signum).name)
                self.context.shutting_down.set()
                previous._run()

            loop.add_signal_handler(signum, on_signal)

    async def process_startup(self, scope: dict, event: dict) -> None:
        self._watch_stop_signals()
        await self.context.db.open()
        for hook in self.context.on_startup:
            await hook()
        # Everything alive now (modules, the app, the OpenAPI document, the pool) lives
        # as long as the process: move it out of the collector's reach. Otherwise every
        # full collection, triggered by the garbage of ordinary requests, walks all of
        # it while the event loop stands still; measured with `make bench` (HTTP
        # scenario), that pause was most of the submit's p99 (about 40 ms -> 15-20 ms).
        gc.collect()
        gc.freeze()
        log.info("API process ready")

    async def process_shutdown(self, scope: dict, event: dict) -> None:
        self.context.shutting_down.set()
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
    context.openapi = auth.secure_document(openapi.build(MODULES))
    app = falcon.asgi.App(middleware=[RequestIdMiddleware(), auth.AuthMiddleware.from_env(),
                                       Lifespan(context)])
    app.req_options.strip_url_path_trailing_slash = True
    errors.install(app)
    for module in MODULES:
        module.install(app, context)
    return app


app = create_app()
