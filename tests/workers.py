"""Support for tests that run real `jobrunner worker` processes."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

from jobrunner import config


def count_jobs(conn, state: str | None = None) -> int:
    """Number of jobs in `state` (every job when None)."""
    return conn.execute("SELECT count(*) FROM jobs WHERE %(state)s::text IS NULL OR state = %(state)s",
                        {"state": state}).fetchone()[0]


def wait_until(predicate: Callable[[], object], timeout: float = 30.0, interval: float = 0.05,
               what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class WorkerProcess:
    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "jobrunner", "worker", *args], env=env, cwd=config.ROOT,
            stdout=self._log, stderr=subprocess.STDOUT)
        self.pid = self.popen.pid
        # The worker id starts with host:pid: (see jobrunner.worker.Worker).
        self.id_prefix = f"{socket.gethostname()}:{self.pid}:"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_listening(self, timeout: float = 30.0) -> None:
        wait_until(lambda: "listener: listening" in self.log() or self.popen.poll() is not None,
                   timeout, what="the worker to listen")
        assert self.popen.poll() is None, self.log()

    def signal(self, signum: int) -> None:
        self.popen.send_signal(signum)

    def wait(self, timeout: float = 60.0) -> int:
        return self.popen.wait(timeout)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def cleanup(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait(30)
        self._log.close()


@pytest.fixture
def start_worker(db_url, tmp_path):
    """Factory: start_worker("--concurrency", "4", url=...) -> WorkerProcess; all killed after."""
    started: list[WorkerProcess] = []

    def start(*args: str, url: str | None = None, env: dict[str, str] | None = None) -> WorkerProcess:
        environment = dict(os.environ, DATABASE_URL=url or db_url, LOG_LEVEL="info",
                           PYTHONUNBUFFERED="1", **(env or {}))
        proc = WorkerProcess(list(args), environment, tmp_path / f"worker-{len(started)}.log")
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.cleanup()
