"""Shared pieces of the benchmark scenarios: the scratch database, the machine's
description, figures with targets, and the real processes a scenario starts
(`jobrunner worker`, gunicorn) with their teardown.
"""
from __future__ import annotations

import os
import platform
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from jobrunner import config
from jobrunner.migrate import migrate
from jobrunner.sqlfile import queries

Q = queries("bench")
ROOT = config.ROOT


# --- figures ------------------------------------------------------------------------------

def metric(name: str, value: float | int | None, unit: str, *, target: float | None = None,
           op: str | None = None, note: str | None = None) -> dict[str, Any]:
    """One reported figure; with a target, whether it met it (op: '>=', '<=' or '==')."""
    out: dict[str, Any] = {"metric": name, "value": value, "unit": unit}
    if target is not None:
        out["target"] = target
        out["op"] = op
        if value is None:
            out["met"] = False
        elif op == "==":
            out["met"] = value == target
        else:
            out["met"] = value >= target if op == ">=" else value <= target
    if note:
        out["note"] = note
    return out


def percentile(values: list[float], p: float) -> float | None:
    """The p-th percentile (0..100) with linear interpolation; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def distribution_ms(values_s: list[float]) -> dict[str, float | int | None]:
    ms = [v * 1000.0 for v in values_s]
    return {"count": len(ms), "p50_ms": percentile(ms, 50), "p95_ms": percentile(ms, 95),
            "p99_ms": percentile(ms, 99), "max_ms": max(ms) if ms else None,
            "min_ms": min(ms) if ms else None}


@dataclass
class Settings:
    """What one run measures: full sizes or the quick smoke sizes."""

    quick: bool = False
    workers: int = 2                 # worker processes of the queue scenarios
    concurrency: int = 16            # execution slots per worker process
    log: Callable[[str], None] = print
    extra: dict[str, Any] = field(default_factory=dict)

    def size(self, full: int, quick: int) -> int:
        return quick if self.quick else full


# --- the machine ----------------------------------------------------------------------------

def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _memory_mb() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return None


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine(url: str, where: str) -> dict[str, Any]:
    with psycopg.connect(url) as conn:
        settings = {name: (f"{setting}{unit}" if unit and unit not in ("8kB",) else setting)
                    for name, setting, unit in conn.execute(Q["server_settings"])}
        shared_buffers = conn.execute("SHOW shared_buffers").fetchone()[0]
        max_wal = conn.execute("SHOW max_wal_size").fetchone()[0]
    settings["shared_buffers"] = shared_buffers
    settings["max_wal_size"] = max_wal
    return {
        "cores": os.cpu_count(),
        "memory_mb": _memory_mb(),
        "cpu_model": _cpu_model(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "hostname_hash": uuid.uuid5(uuid.NAMESPACE_DNS, socket.gethostname()).hex[:8],
        "postgres": {
            "version": settings.pop("server_version", None),
            "where": where,
            "settings": settings,
        },
    }


# --- the scratch database -----------------------------------------------------------------

_HOST_TAG = uuid.uuid5(uuid.NAMESPACE_DNS, socket.gethostname()).hex[:6]


def _drop_stale(conn: psycopg.Connection) -> list[str]:
    """Drop scratch databases left behind by bench runs of this machine whose process is
    gone (a run killed, or the server stopped under it): bench_<host>_<pid>_<random>."""
    dropped = []
    for (name,) in conn.execute(Q["scratch_databases"]).fetchall():
        parts = name.split("_")
        if len(parts) != 4 or parts[1] != _HOST_TAG or not parts[2].isdigit():
            continue
        if Path(f"/proc/{parts[2]}").exists():
            continue  # that run is still going
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        dropped.append(name)
    return dropped


@contextmanager
def scratch_database(base_url: str) -> Iterator[str]:
    """A fresh, migrated database on the server of `base_url`, dropped afterwards: the
    benchmarks never touch the data of the database in use."""
    name = f"bench_{_HOST_TAG}_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(base_url, autocommit=True) as conn:
        _drop_stale(conn)
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = make_conninfo(base_url, dbname=name)
    try:
        migrate(url)
        yield url
    finally:
        close_poll_connection(url)
        with psycopg.connect(base_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)))


def dbname(url: str) -> str:
    return conninfo_to_dict(url).get("dbname") or ""


def reset_jobs(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(Q["reset_jobs"])


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.1,
             what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


_poll_conns: dict[str, psycopg.Connection] = {}


def unfinished(url: str) -> int:
    """Jobs not finished yet (on one kept connection per database: polling must not
    fork a backend per call)."""
    conn = _poll_conns.get(url)
    if conn is None or conn.closed:
        conn = _poll_conns[url] = psycopg.connect(url, autocommit=True)
    return conn.execute(Q["unfinished_count"]).fetchone()[0]


def close_poll_connection(url: str) -> None:
    conn = _poll_conns.pop(url, None)
    if conn is not None:
        conn.close()


def raise_fd_limit() -> None:
    """Thousands of sockets in one process need a higher open-files limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def proc_status_kb(pid: int, field_name: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


# --- processes ----------------------------------------------------------------------------

class Process:
    """A child process in its own process group, its output in a temp file."""

    def __init__(self, argv: list[str], env: dict[str, str], name: str) -> None:
        self.name = name
        self.log_file = tempfile.NamedTemporaryFile(prefix=f"bench-{name}-", suffix=".log",
                                                    delete=False)
        self.log_path = Path(self.log_file.name)
        self.popen = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=self.log_file,
                                      stderr=subprocess.STDOUT, start_new_session=True,
                                      preexec_fn=raise_fd_limit)
        self.pid = self.popen.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, then SIGKILL to the process group after `timeout`."""
        if self.popen.poll() is None:
            try:
                os.killpg(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            code = self.popen.wait(10)
        except subprocess.TimeoutExpired:
            code = None
        self.log_file.close()
        return code

    def cleanup(self) -> None:
        self.stop()
        try:
            self.log_path.unlink()
        except OSError:
            pass


def child_env(url: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ, DATABASE_URL=url, PYTHONUNBUFFERED="1", LOG_LEVEL="info")
    env.update(extra)
    return env


@contextmanager
def workers(url: str, count: int, concurrency: int, *extra_args: str,
            wait_listening: bool = True) -> Iterator[list[Process]]:
    """`count` real `python -m jobrunner worker` processes; SIGTERM (drain) at exit."""
    started: list[Process] = []
    try:
        for i in range(count):
            started.append(Process(
                [sys.executable, "-m", "jobrunner", "worker", "--concurrency", str(concurrency),
                 *extra_args], child_env(url), f"worker{i}"))
        if wait_listening:
            for proc in started:
                wait_for(lambda: "listener: listening" in proc.log() or not proc.alive(),
                         60, what="a worker to listen")
                if not proc.alive():
                    raise RuntimeError(f"worker exited at start:\n{proc.log()[-3000:]}")
        yield started
    finally:
        for proc in started:
            proc.cleanup()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Api:
    process: Process
    port: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def worker_pid(self) -> int | None:
        """The (first) gunicorn worker process serving requests."""
        kids = children(self.process.pid)
        return kids[0] if kids else None

    def worker_pids(self) -> list[int]:
        """Every gunicorn worker process serving requests."""
        return list(children(self.process.pid))


@contextmanager
def api_server(url: str, **env: str) -> Iterator[Api]:
    """The real API under gunicorn (one worker process unless WEB_CONCURRENCY is
    given), on a free port."""
    import httpx

    port = free_port()
    environment = child_env(url, HOST="127.0.0.1", PORT=str(port), WEB_CONCURRENCY="1",
                            GUNICORN_ACCESSLOG="/dev/null", LOG_LEVEL="warning")
    environment.update(env)
    proc = Process([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "api.app:app"],
                   environment, "api")
    try:
        def healthy() -> bool:
            if not proc.alive():
                raise RuntimeError(f"gunicorn exited:\n{proc.log()[-3000:]}")
            try:
                return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2.0).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(healthy, 60, what="gunicorn to answer /healthz")
        yield Api(proc, port)
    finally:
        proc.cleanup()


# --- CPU accounting and profiling -----------------------------------------------------------

def cpu_seconds(pid: int, reaped_children: bool = False) -> float | None:
    """User + system CPU seconds a process has used so far (from /proc); with
    reaped_children, plus those of its children that exited and were waited for."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[11]) + int(fields[12])
        if reaped_children:
            ticks += int(fields[13]) + int(fields[14])
        return ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def machine_cpu() -> tuple[float, float] | None:
    """(busy, total) CPU seconds of the whole machine so far (from /proc/stat)."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return (sum(values) - idle) / tick, sum(values) / tick


def postmaster_pid(url: str) -> int | None:
    """The server's postmaster, when it runs on this machine and we may read its pid file."""
    try:
        with psycopg.connect(url) as conn:
            data_dir = conn.execute("SHOW data_directory").fetchone()[0]
        return int((Path(data_dir) / "postmaster.pid").read_text().split()[0])
    except (psycopg.Error, OSError, ValueError, IndexError):
        return None


def server_cpu_seconds(postmaster: int | None) -> float | None:
    """CPU seconds of the server's processes: the postmaster, its live children, and
    those that exited (the postmaster reaps them: their time is in its children's)."""
    if not postmaster:
        return None
    total = cpu_seconds(postmaster, reaped_children=True)
    if total is None:
        return None
    for child in children(postmaster):
        total += cpu_seconds(child) or 0.0
    return total


class CpuWindow:
    """CPU used by some processes, by the PostgreSQL server (when it runs here) and by
    the whole machine between start() and stop()."""

    def __init__(self, pids: dict[str, int | None], server_url: str | None = None) -> None:
        self.pids = {k: v for k, v in pids.items() if v}
        self.postmaster = postmaster_pid(server_url) if server_url else None
        self.figures: dict[str, Any] = {}

    def start(self) -> "CpuWindow":
        self._t = time.perf_counter()
        self._proc = {k: cpu_seconds(p) for k, p in self.pids.items()}
        self._server = server_cpu_seconds(self.postmaster)
        self._machine = machine_cpu()
        return self

    def stop(self) -> dict[str, Any]:
        wall = time.perf_counter() - self._t
        out: dict[str, Any] = {"wall_s": wall}
        server_now = server_cpu_seconds(self.postmaster)
        if server_now is not None and self._server is not None:
            out["postgres_cpu_s"] = server_now - self._server
        for k, p in self.pids.items():
            now, before = cpu_seconds(p), self._proc.get(k)
            if now is not None and before is not None:
                out[f"{k}_cpu_s"] = now - before
        machine_now = machine_cpu()
        if machine_now and self._machine:
            busy = machine_now[0] - self._machine[0]
            total = machine_now[1] - self._machine[1]
            out["machine_busy_fraction"] = busy / total if total else None
            out["machine_busy_cpu_s"] = busy
            # Everything else on the machine (other users' processes among them).
            out["other_cpu_s"] = busy - sum(v for k, v in out.items()
                                            if k.endswith("_cpu_s") and k != "machine_busy_cpu_s")
        self.figures = out
        return out


@contextmanager
def profiled(s: "Settings", pid: int | None, name: str) -> Iterator[None]:
    """py-spy record of `pid` while the block runs, when --profile DIR was given and
    py-spy is installed (a speedscope JSON file DIR/<name>.json)."""
    import shutil

    directory = s.extra.get("profile")
    spy = shutil.which("py-spy") or (str(Path(sys.executable).with_name("py-spy"))
                                     if Path(sys.executable).with_name("py-spy").exists() else None)
    if not directory or not pid or not spy:
        yield
        return
    Path(directory).mkdir(parents=True, exist_ok=True)
    out = Path(directory) / f"{name}.json"
    proc = subprocess.Popen([spy, "record", "-p", str(pid), "-r", "200", "-f", "speedscope",
                             "-o", str(out), "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        s.log(f"  profile: {out}")
