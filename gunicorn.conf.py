"""gunicorn settings for the API: `gunicorn -c gunicorn.conf.py api.app:app`."""
import os

bind = f"{os.environ.get('HOST', '127.0.0.1')}:{os.environ.get('PORT', '8000')}"
workers = int(os.environ.get("WEB_CONCURRENCY", "1"))
# gunicorn's native ASGI worker runs falcon.asgi.App on an event loop: thousands of
# long-polling clients cost coroutines, not threads.
worker_class = "asgi"
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "30"))
# Must exceed the longest long-poll wait (60 s) so waiters are answered before exit.
graceful_timeout = int(os.environ.get("GUNICORN_GRACEFUL_TIMEOUT", "70"))
keepalive = 5
accesslog = "-"
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "info")
