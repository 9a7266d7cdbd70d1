"""Request ids and logging.

Every request gets an id: the client's `X-Request-ID` when it is sane (1..128 characters
of letters, digits and `._:-`), a fresh uuid4 hex otherwise. The id is echoed in the
`X-Request-ID` response header, stored in `req.context.request_id`, and put on every log
line written while the request is handled (a context variable read by a logging filter;
`asyncio.to_thread` copies it into worker threads too).
"""
from __future__ import annotations

import contextvars
import logging
import re
import sys
import time
import uuid

import falcon

from jobrunner import config

HEADER = "X-Request-ID"
_SANE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}")

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

log = logging.getLogger("api.request")


def sane_request_id(value: str | None) -> str | None:
    """The value if it is usable as a request id, else None."""
    if value and _SANE.fullmatch(value):
        return value
    return None


def new_request_id() -> str:
    return uuid.uuid4().hex


class RequestIdFilter(logging.Filter):
    """Adds `request_id` to every record (`-` outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id_var.get()
        return True


LOG_FORMAT = "[%(asctime)s] [%(process)d] [%(levelname)s] %(name)s request_id=%(request_id)s %(message)s"


def configure_logging() -> None:
    """Log the `api` and `jobrunner` loggers to stderr with the request id (idempotent)."""
    level = (config.env_str("LOG_LEVEL", "info") or "info").upper()
    for name in ("api", "jobrunner"):
        logger = logging.getLogger(name)
        if any(getattr(h, "_api_handler", False) for h in logger.handlers):
            continue
        handler = logging.StreamHandler(sys.stderr)
        handler._api_handler = True  # type: ignore[attr-defined]
        handler.addFilter(RequestIdFilter())
        handler.setFormatter(logging.Formatter(LOG_FORMAT, "%Y-%m-%d %H:%M:%S %z"))
        logger.addHandler(handler)
        logger.setLevel(getattr(logging, level, logging.INFO))
        logger.propagate = False


class RequestIdMiddleware:
    """Takes or makes the request id; echoes it; logs slow and failed requests."""

    async def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        request_id = sane_request_id(req.get_header(HEADER)) or new_request_id()
        req.context.request_id = request_id
        req.context.started = time.monotonic()
        request_id_var.set(request_id)
        resp.set_header(HEADER, request_id)

    async def process_response(self, req: falcon.Request, resp: falcon.Response,
                               resource: object, req_succeeded: bool) -> None:
        request_id = getattr(req.context, "request_id", None)
        if request_id is None:  # process_request did not run (should not happen)
            request_id = new_request_id()
            req.context.request_id = request_id
        resp.set_header(HEADER, request_id)
        started = getattr(req.context, "started", None)
        elapsed_ms = (time.monotonic() - started) * 1000 if started is not None else -1.0
        log.debug("%s %s -> %s in %.1f ms", req.method, req.relative_uri, resp.status, elapsed_ms)
