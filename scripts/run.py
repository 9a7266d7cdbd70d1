"""`make run`: database, migrations, seed data, then the API and one worker.

Runs gunicorn and `jobrunner worker` as child processes in the foreground; Ctrl-C
(or SIGTERM) stops both cleanly and waits for them.
"""
from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time

import psycopg

from jobrunner import config, db
from jobrunner.migrate import migrate
from jobrunner.sqlfile import queries


def main() -> int:
    url = db.database_url()  # starts or re-attaches to the embedded server
    print(f"database: {url}")
    migrate(url, verbose=True)
    with psycopg.connect(url) as conn:
        empty = conn.execute(queries("orders")["count"]).fetchone()[0] == 0
    if empty:
        from scripts import seed
        seed.main([])
    env = dict(os.environ, DATABASE_URL=url)
    admin_token = config.env_str("ADMIN_TOKEN")
    if admin_token is None:
        # A token for this session only, so the dashboard and the admin API work locally.
        admin_token = env["ADMIN_TOKEN"] = secrets.token_urlsafe(18)
    port = config.env_str("PORT", "8000")
    host = config.env_str("HOST", "127.0.0.1")
    # Own sessions: the terminal's Ctrl-C reaches only this process, which then sends one
    # SIGTERM to each child, so the worker drains within its grace period and gunicorn
    # answers waiting long-polls (a second signal would mean "stop now" to both).
    children = [
        subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "api.app:app"],
                         env=env, cwd=config.ROOT, start_new_session=True),
        subprocess.Popen([sys.executable, "-m", "jobrunner", "worker"], env=env, cwd=config.ROOT,
                         start_new_session=True),
    ]
    base = f"http://{host}:{port}"
    print(f"""
API on {base} (Ctrl-C stops the API and the worker)
  curl {base}/healthz
  curl {base}/api/1.0/report/payments
  curl -i -X POST {base}/api/2.0/report/payments
  curl '{base}/api/2.0/report/payments/<job_id>?wait=30'
  curl -H 'Authorization: Bearer {admin_token}' '{base}/api/admin/jobs?state=dead'
Dashboard: {base}/dashboard  (admin token: {admin_token})
Metrics:   {base}/metrics
""", flush=True)

    stopping = False

    def stop(signum, frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    while not stopping and all(child.poll() is None for child in children):
        time.sleep(0.2)
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    code = 0
    for child in children:
        try:
            rc = child.wait(timeout=90)
        except subprocess.TimeoutExpired:
            child.kill()
            rc = child.wait()
        code = code or (rc if rc and rc > 0 else 0)
    return code if not stopping else 0


if __name__ == "__main__":
    sys.exit(main())
