"""Scenario 6: HTTP throughput and tail latency at 64 concurrent connections.

The API under gunicorn with one worker process per core (WEB_CONCURRENCY, as README.md
recommends; `--web-concurrency N` to change it) on a scratch database with 5,000 orders
(scripts.seed, fixed seed); then, for contrast, v2 submit against one process. The load comes from another process: wrk (installed with
apt-get when missing, if we are root and BENCH_INSTALL_WRK is not 0; never in --quick),
or else a keep-alive asyncio client of our own (`python -m bench.http_load client`).
The JSON says which was used.

- v1: `GET /api/1.0/report/payments` (the synchronous report of 5,000 orders);
- v2 submit: `POST /api/2.0/report/payments` (no worker runs, so the report job stays
  queued and every submit after the first returns it: the steady state of the submit
  path, dedupe included). Skipped when the API has no v2.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from scripts import seed

from .common import CpuWindow, Settings, api_server, distribution_ms, metric, profiled

CONNECTIONS = 64
TARGET_V2_P99_MS = 20.0
V1_PATH = "/api/1.0/report/payments"
V2_PATH = "/api/2.0/report/payments"


# --- the load generators ---------------------------------------------------------------------

def ensure_wrk(allow_install: bool, log) -> str | None:
    found = shutil.which("wrk")
    if found or not allow_install:
        return found
    if os.geteuid() != 0 or os.environ.get("BENCH_INSTALL_WRK", "1").lower() in ("0", "no", "false"):
        return None
    log("  wrk not found: installing it with apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for step in (["apt-get", "install", "-y", "-q", "wrk"],
                 ["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "wrk"]):
        try:
            subprocess.run(step, env=env, capture_output=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired):
            return None
        if shutil.which("wrk"):
            break
    return shutil.which("wrk")


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not m:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(m[1]) * _UNITS[m[2]]


def parse_wrk(output: str) -> dict:
    out: dict = {}
    for pct in ("50", "75", "90", "99"):
        m = re.search(rf"^\s+{pct}(?:\.0+)?%\s+(\S+)", output, re.MULTILINE)
        if m:
            out[f"p{pct}_ms"] = _ms(m[1])
    m = re.search(r"Requests/sec:\s+([\d.]+)", output)
    out["requests_per_s"] = float(m[1]) if m else None
    m = re.search(r"(\d+) requests in ([\d.]+\w+)", output)
    out["requests"] = int(m[1]) if m else None
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    out["non_2xx"] = int(m[1]) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    out["socket_errors"] = sum(int(x) for x in m.groups()) if m else 0
    return out


def run_wrk(wrk: str, url: str, method: str, seconds: int) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(f'wrk.method = "{method}"\n')
    try:
        proc = subprocess.run(
            [wrk, "-t", "2", "-c", str(CONNECTIONS), "-d", f"{seconds}s", "--latency",
             "--timeout", "10s", "-s", script.name, url],
            capture_output=True, text=True, timeout=seconds + 60)
    finally:
        os.unlink(script.name)
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed: {proc.stderr.strip() or proc.stdout.strip()}")
    figures = parse_wrk(proc.stdout)
    figures["raw"] = proc.stdout
    return figures


async def _connection(port: int, request: bytes, deadline: float, latencies: list[float],
                      statuses: dict[int, int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length, close = 0, False
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value.strip())
                elif name == b"connection" and value.strip().lower() == b"close":
                    close = True
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - started)
            statuses[status] = statuses.get(status, 0) + 1
            if close:
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
    finally:
        writer.close()


async def _python_load(port: int, method: str, path: str, seconds: float) -> dict:
    request = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
               f"Content-Length: 0\r\n\r\n").encode()
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    started = time.perf_counter()
    deadline = started + seconds
    results = await asyncio.gather(*(_connection(port, request, deadline, latencies, statuses)
                                     for _ in range(CONNECTIONS)), return_exceptions=True)
    elapsed = time.perf_counter() - started
    dist = distribution_ms(latencies)
    return {"requests": len(latencies), "requests_per_s": len(latencies) / elapsed,
            "p50_ms": dist["p50_ms"], "p99_ms": dist["p99_ms"], "max_ms": dist["max_ms"],
            "non_2xx": sum(c for s, c in statuses.items() if not 200 <= s < 400),
            "socket_errors": sum(1 for r in results if isinstance(r, BaseException)),
            "statuses": statuses}


def run_python(port: int, method: str, path: str, seconds: int) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.http_load", "client", "--port", str(port),
         "--method", method, "--path", path, "--seconds", str(seconds)],
        capture_output=True, text=True, timeout=seconds + 120)
    if proc.returncode != 0:
        raise RuntimeError(f"load client failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- the scenario ------------------------------------------------------------------------------

def web_processes(s: Settings) -> int:
    """API processes for the scenario: --web-concurrency, else one per core (what
    README.md recommends for WEB_CONCURRENCY on a machine of its own)."""
    return max(1, int(s.extra.get("web_concurrency") or os.cpu_count() or 1))


def _measure(s: Settings, url: str, api, name: str, method: str, path: str, wrk: str | None,
             seconds: int) -> dict:
    pids = api.worker_pids()
    cpu = CpuWindow({f"api{i}": pid for i, pid in enumerate(pids)}, url).start()
    with profiled(s, pids[0] if pids else None, "http-" + name.replace(" ", "-").replace(",", "")):
        if wrk:
            figures = run_wrk(wrk, api.base_url + path, method, seconds)
        else:
            figures = run_python(api.port, method, path, seconds)
    window = cpu.stop()
    window["api_cpu_s"] = sum(v for k, v in list(window.items())
                              if k.startswith("api") and k.endswith("_cpu_s"))
    figures["cpu"] = window
    figures["api_processes"] = len(pids)
    s.log(f"  {name}: {figures['requests_per_s']:,.0f} req/s, p99 "
          f"{figures.get('p99_ms') or 0:.1f} ms, non-2xx {figures['non_2xx']}, "
          f"socket errors {figures['socket_errors']} ({'wrk' if wrk else 'python-asyncio'}); "
          f"{len(pids)} API process(es), their CPU {window['api_cpu_s'] / window['wall_s'] * 100:.0f}% "
          f"of a core, machine busy {(window.get('machine_busy_fraction') or 0) * 100:.0f}%")
    return figures


def run(url: str, s: Settings) -> dict:
    seconds = s.size(10, 2)
    loadgen_choice = s.extra.get("loadgen", "auto")
    wrk = None if loadgen_choice == "python" else ensure_wrk(not s.quick, s.log)
    if loadgen_choice == "wrk" and not wrk:
        raise RuntimeError("--loadgen wrk: wrk is not installed and could not be installed")
    loadgen = "wrk" if wrk else "python-asyncio"
    seed.run(seed.parse_args(["--truncate", "--count", "5000", "--seed", "20251203", "--quiet"]), url)
    processes = web_processes(s)
    results: dict[str, dict] = {}
    v2 = False
    # The deployment (WEB_CONCURRENCY = processes), then, for contrast, one process.
    rounds = [(processes, ("v1 report", "v2 submit"))]
    if processes != 1:
        rounds.append((1, ("v2 submit",)))
    for count, names in rounds:
        with api_server(url, WEB_CONCURRENCY=str(count)) as api:
            # Warm: one request of each kind per process (imports, pool, plans).
            for _ in range(2 * count):
                httpx.get(api.base_url + V1_PATH, timeout=30).raise_for_status()
                v2 = httpx.post(api.base_url + V2_PATH, timeout=30).status_code == 202
            for name in names:
                if name == "v2 submit" and not v2:
                    continue
                method, path = ("GET", V1_PATH) if name == "v1 report" else ("POST", V2_PATH)
                label = name if count == processes else f"{name}, one API process"
                results[label] = _measure(s, url, api, label, method, path, wrk, seconds)
    metrics = []
    for name, figures in results.items():
        target = name == "v2 submit"
        metrics.append(metric(f"{name} req/s", figures["requests_per_s"], "req/s"))
        metrics.append(metric(f"{name} p99", figures.get("p99_ms"), "ms",
                              target=TARGET_V2_P99_MS if target else None,
                              op="<=" if target else None))
        metrics.append(metric(f"{name} errors (non-2xx + socket)",
                              figures["non_2xx"] + figures["socket_errors"], "req",
                              target=0, op="<="))
    if "v2 submit" not in results:
        metrics.append(metric("v2 submit p99", None, "ms", note="skipped: v2 not available"))
    return {
        "scenario": "http",
        "method": (f"{CONNECTIONS} connections for {seconds} s per endpoint from another process "
                   f"({loadgen}); {processes} gunicorn worker process(es) (WEB_CONCURRENCY), "
                   f"then v2 submit on one; 5,000 orders"),
        "load_generator": loadgen,
        "connections": CONNECTIONS,
        "seconds": seconds,
        "web_concurrency": processes,
        "endpoints": results,
        "v2_available": v2,
        "metrics": metrics,
    }


def client_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="bench.http_load client")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--method", default="GET")
    p.add_argument("--path", required=True)
    p.add_argument("--seconds", type=float, default=10)
    args = p.parse_args(argv)
    print(json.dumps(asyncio.run(_python_load(args.port, args.method, args.path, args.seconds))))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "client":
        sys.exit(client_main(sys.argv[2:]))
    print("usage: python -m bench.http_load client --port P --path /x [--method GET]",
          file=sys.stderr)
    sys.exit(2)
