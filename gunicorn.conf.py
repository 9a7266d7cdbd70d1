"""gunicorn settings for the API: `gunicorn -c gunicorn.conf.py api.app:app`.

Every value can be overridden on the command line; the environment variables are
documented in README.md (Configuration).
"""
import os


def _env(name: str, default: str) -> str:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


bind = f"{_env('HOST', '127.0.0.1')}:{_env('PORT', '8000')}"
workers = int(_env("WEB_CONCURRENCY", "1"))

# gunicorn's native ASGI worker runs falcon.asgi.App on an asyncio event loop: thousands
# of long-polling clients cost coroutines, not threads. The app's lifespan startup (in
# each worker, after the fork) opens its database pool; "on" stops gunicorn if it fails.
worker_class = "asgi"
asgi_lifespan = "on"

# The worker's heartbeat comes from its event loop: a loop blocked this long gets the
# worker killed and replaced. Slow work runs in threads, so this is a safety net only.
timeout = int(_env("GUNICORN_TIMEOUT", "30"))
# On SIGTERM, in-flight requests get this long to finish. It must exceed the longest
# long-poll wait (60 s) so waiting clients are answered before the worker exits.
graceful_timeout = int(_env("GUNICORN_GRACEFUL_TIMEOUT", "75"))
keepalive = int(_env("GUNICORN_KEEPALIVE", "5"))
# Pending connections the kernel queues for accept (many clients connecting at once).
backlog = int(_env("GUNICORN_BACKLOG", "2048"))

# The control socket (gunicornc) defaults to one path per user, which several servers on
# one machine would fight over: opt in with GUNICORN_CONTROL_SOCKET=<path>.
_control = _env("GUNICORN_CONTROL_SOCKET", "")
if _control:
    control_socket = _control
else:
    control_socket_disable = True

# Logs go to stderr (one stream for the process manager to collect). Access lines carry
# the request id the API echoes in X-Request-ID; app lines carry it too (api/middleware.py).
accesslog = _env("GUNICORN_ACCESSLOG", "-")
errorlog = "-"
loglevel = _env("LOG_LEVEL", "info")
access_log_format = (
    '%(t)s %(h)s "%(r)s" %(s)s %(B)s %(M)sms request_id=%({x-request-id}o)s "%(a)s"'
)
