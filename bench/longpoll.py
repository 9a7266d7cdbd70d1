"""Scenario 4: long-poll.

N `report.payments` jobs are enqueued (enqueue_many; no worker runs yet; the orders
table is empty, so each job is a real but short aggregation). One API process (gunicorn,
WEB_CONCURRENCY=1) is started; a client process (plain asyncio sockets, one connection
per client, `Connection: close`) opens N connections and sends
`GET /api/2.0/report/payments/<id>?wait=60`, one per job. Once all are sent and have
settled, the backends of the scratch database whose last statement was a LISTEN are
counted (only the API runs at that point), then W workers start and work the jobs.
For each job: the client's clock when its answer was fully read, minus the job's
finished_at (the commit that made it final) from the database: p50, p99, max. The API
process's peak memory is its VmHWM (from /proc), beside its VmRSS when idle.

If the API has no v2 endpoints, the scenario is reported as skipped.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psycopg

from jobrunner import queue
from jobrunner.listener import Listener

from .common import (Q, CpuWindow, Settings, api_server, distribution_ms, metric, profiled,
                     proc_status_kb, raise_fd_limit, reset_jobs, workers)

TARGET_P99_MS = 50.0
TARGET_LISTENERS = 1
WAIT = 60
KIND = "report.payments"


# --- the client (a process of its own) ------------------------------------------------------

async def _one(port: int, job_id: int, wait: int, sent: asyncio.Event | None,
               results: dict[int, tuple]) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET /api/2.0/report/payments/{job_id}?wait={wait} HTTP/1.1\r\n"
                 f"Host: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    return reader, writer


async def _answer(job_id: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                  results: dict[int, tuple]) -> None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = None
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        body = await (reader.readexactly(length) if length is not None else reader.read())
        answered = time.time()
        try:
            job_status = json.loads(body)["data"]["status"]
        except (ValueError, KeyError, TypeError):
            job_status = None
        results[job_id] = (answered, status, job_status)
    except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
        results[job_id] = (time.time(), 0, f"error: {type(exc).__name__}")
    finally:
        writer.close()


async def client(port: int, ids: list[int], wait: int, out: Path, connect_batch: int = 250) -> None:
    results: dict[int, tuple] = {}
    pending = []
    for i in range(0, len(ids), connect_batch):
        chunk = ids[i:i + connect_batch]
        pairs = await asyncio.gather(*(_one(port, j, wait, None, results) for j in chunk))
        pending.extend(asyncio.create_task(_answer(j, r, w, results))
                       for j, (r, w) in zip(chunk, pairs))
    print(f"ready {len(pending)}", flush=True)
    await asyncio.gather(*pending)
    out.write_text(json.dumps({str(k): v for k, v in results.items()}))


def client_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="bench.longpoll client")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--ids", type=Path, required=True, help="JSON list of job ids")
    p.add_argument("--wait", type=int, default=WAIT)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    raise_fd_limit()
    asyncio.run(client(args.port, json.loads(args.ids.read_text()), args.wait, args.out))
    return 0


# --- the scenario -----------------------------------------------------------------------------

def v2_available(base_url: str) -> bool:
    """The v2 status route exists (an unknown job gives a 404 that names the job, not the
    route: probe with the OpenAPI document instead, which lists every route)."""
    try:
        doc = httpx.get(base_url + "/openapi.json", timeout=10).json()
    except (httpx.HTTPError, ValueError):
        return False
    return any(path.startswith("/api/2.0/report/payments/{") for path in doc.get("paths", {}))


def complete_directly(url: str, n: int, rate: float, batch: int = 10) -> None:
    """Finish n queued jobs through the queue's own claim and complete (the statements a
    worker runs, completion NOTIFY included), at `rate` jobs/s, without running the
    aggregation: the API's part of the latency, away from the work's CPU load."""
    done = 0
    interval = batch / rate
    with psycopg.connect(url, autocommit=True) as conn:
        start = time.perf_counter()
        rounds = 0
        while done < n:
            due = start + rounds * interval
            pause = due - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
            rounds += 1
            claimed = queue.claim(conn, queue=queue.DEFAULT_QUEUE, limit=batch,
                                  worker_id="bench-completer", lease=60)
            if not claimed:
                if time.perf_counter() - start > 120:
                    raise RuntimeError(f"direct completion: only {done} of {n} jobs found")
                continue
            queue.complete(conn, "bench-completer", [(c.id, c.attempts, {"data": []})
                                                     for c in claimed])
            done += len(claimed)


def _round(url: str, api, pid: int | None, n: int, s: Settings, how: str) -> dict:
    """One round: n jobs, n waiting clients, then the jobs finish (`how`: "workers" or
    "direct"); the figures of this round."""
    reset_jobs(url)
    with psycopg.connect(url) as conn:
        ids = queue.enqueue_many(KIND, [{}] * n, conn=conn)
        conn.commit()
    with tempfile.TemporaryDirectory(prefix="bench-longpoll-") as tmp:
        ids_file, out_file = Path(tmp) / "ids.json", Path(tmp) / "out.json"
        ids_file.write_text(json.dumps(ids))
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.longpoll", "client", "--port", str(api.port),
             "--ids", str(ids_file), "--out", str(out_file), "--wait", str(WAIT)],
            stdout=subprocess.PIPE, text=True, preexec_fn=raise_fd_limit)
        try:
            line = proc.stdout.readline()
            if not line.startswith("ready"):
                raise RuntimeError(f"long-poll client failed to start: {line!r}")
            time.sleep(s.size(3.0, 1.0))  # let the API read each job and park its waiter
            with psycopg.connect(url) as conn:
                listening, backends = conn.execute(Q["listening_backends"]).fetchone()
                queued = conn.execute(Q["unfinished_count"]).fetchone()[0]
            waiting_rss_kb = proc_status_kb(pid, "VmRSS") if pid else None
            s.log(f"  [{how}] {n:,} waiters parked; {listening} listening backend(s) of "
                  f"{backends}; {queued:,} jobs not finished")
            # An independent probe: this process LISTENs too and notes when each job's
            # completion NOTIFY arrives, splitting the latency into commit + delivery
            # (finished_at -> notification) and the API's part (notification -> answer).
            heard: dict[int, float] = {}

            def on_done(notify) -> None:
                try:
                    heard.setdefault(int(json.loads(notify.payload)["id"]), time.time())
                except (ValueError, KeyError, TypeError):
                    pass

            probe = Listener(url, [queue.DONE_CHANNEL], on_done, name="bench-probe").start()
            probe.wait_connected(30)
            with profiled(s, pid, f"long-poll-api-{how}"):
                if how == "workers":
                    with workers(url, s.workers, s.concurrency, "--poll-interval", "1",
                                 wait_listening=False) as procs:
                        pids = {"api": pid, "client": proc.pid}
                        pids.update({f"worker{i}": p.pid for i, p in enumerate(procs)})
                        cpu = CpuWindow(pids, url).start()
                        proc.wait(timeout=WAIT + 60)
                        cpu_figures = cpu.stop()
                else:
                    cpu = CpuWindow({"api": pid, "client": proc.pid, "bench": os.getpid()},
                                    url).start()
                    complete_directly(url, n, rate=s.size(1000, 600))
                    proc.wait(timeout=WAIT + 60)
                    cpu_figures = cpu.stop()
            probe.stop()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        answers = json.loads(out_file.read_text()) if out_file.exists() else {}
    with psycopg.connect(url) as conn:
        rows = conn.execute(Q["finished_at_epochs"], {"ids": ids}).fetchall()
    finished = {job_id: (at, state) for job_id, at, state in rows}
    done_at = [at for at, _ in finished.values() if at is not None]
    window = (max(done_at) - min(done_at)) if done_at else None
    latencies, not_final, errors = [], 0, 0
    to_notify, notify_to_answer = [], []
    for key, (answered, status, job_status) in answers.items():
        at, state = finished.get(int(key), (None, None))
        if status != 200 or job_status not in queue.FINAL_STATES:
            not_final += 1
            if status == 0 or status >= 500:
                errors += 1
            continue
        if at is not None:
            latencies.append(answered - at)
            if int(key) in heard:
                to_notify.append(heard[int(key)] - at)
                notify_to_answer.append(answered - heard[int(key)])
    dist = distribution_ms(latencies)
    s.log(f"  [{how}] answered after completion: p50 {dist['p50_ms'] or 0:.1f} ms  p99 "
          f"{dist['p99_ms'] or 0:.1f} ms  max {dist['max_ms'] or 0:.1f} ms; not final "
          f"{not_final}; jobs finished over {window or 0:.1f} s; machine busy "
          f"{(cpu_figures.get('machine_busy_fraction') or 0) * 100:.0f}%")
    split_a, split_b = distribution_ms(to_notify), distribution_ms(notify_to_answer)
    s.log(f"  [{how}] of which finished_at -> NOTIFY heard: p50 {split_a['p50_ms'] or 0:.1f} ms "
          f"p99 {split_a['p99_ms'] or 0:.1f} ms; NOTIFY -> answer: p50 {split_b['p50_ms'] or 0:.1f} ms "
          f"p99 {split_b['p99_ms'] or 0:.1f} ms")
    return {
        "finished_by": how,
        "clients": n,
        "answers": len(answers),
        "answered_final": len(latencies),
        "not_final_or_failed": not_final,
        "errors": errors,
        "latency_after_finish": dist,
        "finished_at_to_notification": distribution_ms(to_notify),
        "notification_to_answer": distribution_ms(notify_to_answer),
        "jobs_finished_over_s": window,
        "listening_backends": listening,
        "api_backends": backends,
        "api_rss_waiting_mb": (waiting_rss_kb or 0) / 1024,
        "cpu_while_finishing": cpu_figures,
    }


def run(url: str, s: Settings) -> dict:
    n = s.size(5_000, 300)
    reset_jobs(url)
    with api_server(url) as api:
        if not v2_available(api.base_url):
            return {"scenario": "long-poll", "status": "skipped", "reason": "v2 not available",
                    "metrics": []}
        pid = api.worker_pid()
        idle_rss_kb = proc_status_kb(pid, "VmRSS") if pid else None
        real = _round(url, api, pid, n, s, "workers")
        direct = _round(url, api, pid, n, s, "direct")
        peak_kb = proc_status_kb(pid, "VmHWM") if pid else None
    return {
        "scenario": "long-poll",
        "method": (f"{n:,} report.payments jobs (empty orders), {n:,} clients (one connection "
                   f"each, asyncio sockets in another process) GET ...?wait={WAIT} on one API "
                   f"process (gunicorn, WEB_CONCURRENCY=1); the jobs are then finished by "
                   f"{s.workers} workers running the report (round 'workers'), and in a second "
                   "round by the queue's claim/complete called directly at a steady rate without "
                   "the aggregation's CPU load (round 'direct'); answer time (client clock) - "
                   "finished_at"),
        "rounds": {"workers": real, "direct": direct},
        "api_rss_idle_mb": (idle_rss_kb or 0) / 1024,
        "api_peak_mb": (peak_kb or 0) / 1024,
        "metrics": [
            metric("clients answered with the final state", real["answered_final"], "clients",
                   target=n, op=">="),
            metric("p50 after finish (workers)", real["latency_after_finish"]["p50_ms"], "ms"),
            metric("p99 after finish (workers)", real["latency_after_finish"]["p99_ms"], "ms",
                   target=TARGET_P99_MS, op="<="),
            metric("p50 after finish (direct)", direct["latency_after_finish"]["p50_ms"], "ms"),
            metric("p99 after finish (direct)", direct["latency_after_finish"]["p99_ms"], "ms"),
            metric("listening connections", real["listening_backends"], "conn",
                   target=TARGET_LISTENERS, op="=="),
            metric("API process peak memory (VmHWM)", (peak_kb or 0) / 1024, "MB"),
        ],
    }


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "client":
        sys.exit(client_main(sys.argv[2:]))
    print("usage: python -m bench.longpoll client --port P --ids FILE --out FILE", file=sys.stderr)
    sys.exit(2)
