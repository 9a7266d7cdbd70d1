"""End-to-end fixtures: the real API under the real gunicorn, on a free port.

    def test_something(new_database, gunicorn):
        server = gunicorn(new_database())              # waits for /healthz
        server2 = gunicorn(url, env={"WEB_CONCURRENCY": "2"}, args=["--log-level", "debug"])
        with server.client() as http:                  # httpx.Client on server.base_url
            assert http.get("/readyz").status_code == 200
        async with server.async_client() as http: ...  # httpx.AsyncClient (many at once)
        server.logs()                                  # what gunicorn wrote so far
        server.send_signal(signal.SIGTERM)             # to the master; returns at once
        server.stop()                                  # SIGTERM, wait, SIGKILL; the fixture also stops it

Each server runs in its own process group; teardown sends SIGTERM and, after a grace
period, SIGKILL to that group only, so no worker outlives the test.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from jobrunner import config


START_TIMEOUT = 60.0   # seconds for gunicorn to answer /healthz (2 shared cores: be generous)
STOP_TIMEOUT = 20.0    # seconds between SIGTERM and SIGKILL in teardown


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class GunicornServer:
    process: subprocess.Popen
    port: int
    log_path: Path
    database_url: str

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return self.base_url + path

    def client(self, **kwargs) -> httpx.Client:
        kwargs.setdefault("timeout", 30.0)
        return httpx.Client(base_url=self.base_url, **kwargs)

    def async_client(self, **kwargs) -> httpx.AsyncClient:
        kwargs.setdefault("timeout", 30.0)
        return httpx.AsyncClient(base_url=self.base_url, **kwargs)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    def send_signal(self, signum: int = signal.SIGTERM) -> None:
        """Signal the gunicorn master only (it relays to its workers), as a supervisor would."""
        if self.process.poll() is None:
            self.process.send_signal(signum)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM to the master (graceful), then SIGKILL to the whole group; the exit status."""
        if self.process.poll() is None:
            self.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # stray workers, if any
        except (ProcessLookupError, PermissionError):
            pass
        try:
            return self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            return None


def _wait_healthy(server: GunicornServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not server.alive():
            raise RuntimeError(f"gunicorn exited with {server.process.returncode}:\n{server.logs()}")
        try:
            if httpx.get(server.url("/healthz"), timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"gunicorn did not answer /healthz within {timeout} s:\n{server.logs()}")


@pytest.fixture
def gunicorn(tmp_path):
    """Factory: `gunicorn(database_url, env=None, args=())` -> a started GunicornServer."""
    started: list[GunicornServer] = []

    def start(database_url: str, *, env: dict[str, str] | None = None, args=(),
              timeout: float = START_TIMEOUT) -> GunicornServer:
        port = free_port()
        environment = dict(os.environ)
        environment.update({
            "DATABASE_URL": database_url,
            "HOST": "127.0.0.1",
            "PORT": str(port),
            "WEB_CONCURRENCY": "1",
            "PYTHONUNBUFFERED": "1",
            # The metrics files live in this test's directory: a server killed in teardown
            # (no on_exit) leaves nothing behind in the system's temp dir.
            "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / f"metrics-{port}"),
        })
        environment.update(env or {})
        log_path = tmp_path / f"gunicorn-{port}.log"
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", *args, "api.app:app"],
                cwd=config.ROOT, env=environment, stdout=log_file, stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: teardown kills it whole
            )
        server = GunicornServer(process, port, log_path, database_url)
        started.append(server)
        _wait_healthy(server, timeout)
        return server

    yield start
    for server in started:
        server.stop()
