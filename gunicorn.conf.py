"""gunicorn settings for the API: `gunicorn -c gunicorn.conf.py api.app:app`.

Every value can be overridden on the command line; the environment variables are
documented in README.md (Configuration).
"""
import os
import resource
import shutil
import tempfile
from pathlib import Path


def _env(name: str, default: str) -> str:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


# Prometheus multiprocess mode (GET /metrics adds up the figures of every worker): each
# worker writes its figures to files in PROMETHEUS_MULTIPROC_DIR, which must be set before
# any process imports prometheus_client, i.e. here, in the master, before the fork. The
# directory is emptied at start (stale files would be added to the new figures); without
# PROMETHEUS_MULTIPROC_DIR a temporary one is made and removed when gunicorn exits.
_metrics_dir_owned = not os.environ.get("PROMETHEUS_MULTIPROC_DIR")
if _metrics_dir_owned:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="jobrunner-api-metrics-")
else:
    Path(os.environ["PROMETHEUS_MULTIPROC_DIR"]).mkdir(parents=True, exist_ok=True)
    for _stale in Path(os.environ["PROMETHEUS_MULTIPROC_DIR"]).glob("*.db"):
        _stale.unlink(missing_ok=True)


def child_exit(server, worker):
    """A worker exited: its live gauges (long-poll waiters) stop counting."""
    from jobrunner import metrics

    metrics.mark_process_dead(worker.pid)


def on_exit(server):
    if _metrics_dir_owned:
        shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)


# Every waiting long-poll client holds a socket: lift the soft open-file limit to the hard
# one (a common soft default of 1024 would cap a process far below 5,000 waiters).
_soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if _hard == resource.RLIM_INFINITY or _soft < _hard:
    resource.setrlimit(resource.RLIMIT_NOFILE, (_hard if _hard != resource.RLIM_INFINITY else max(_soft, 65536), _hard))

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
