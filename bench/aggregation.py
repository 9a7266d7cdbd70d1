"""Benchmark scenario 5: the payments aggregation beside PostgreSQL's own GROUP BY.

    python -m bench.aggregation [--sizes 5000,1000000,10000000] [--repeats 3] [--users N]

For each size the orders table is emptied and seeded (scripts.seed, fixed seed), then
vacuumed (hint bits, visibility map) so neither side pays for first-read writes. A fresh
subprocess then alternates, `repeats` times, the SQL yardstick
`SELECT user_id, sum(total) FROM orders GROUP BY user_id` (fetched with psycopg) and
`aggregate.payments(url)`: best-of-N seconds of each, their ratio, rows/s, whether the
two results are equal, and the peak resident memory of that process above its idle
level (VmHWM after resetting it, minus VmRSS just before the call).

It REPLACES the contents of the orders table of the database it is given.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import psycopg

from jobrunner import aggregate, db
from scripts import seed

DEFAULT_SIZES = (5_000, 1_000_000, 10_000_000)
# The shop's data as `make seed` makes it: user ids 1..5. (Many users make GROUP BY's hash
# aggregate the slower side; few users are the hard case for us.)
DEFAULT_USERS = 5
MANY_USERS = 100_000
TARGET_RATIO = 1.5
TARGET_MEMORY_MB = 100
GROUP_BY = "SELECT user_id, sum(total) FROM orders GROUP BY user_id"


def _seed(url: str, rows: int, users: int) -> None:
    seed.run(seed.parse_args(["--truncate", "--count", str(rows), "--users", str(users),
                              "--seed", "20251203", "--quiet"]), url)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM (ANALYZE) orders")


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


class _ServerCpu:
    """CPU seconds used by backends that have exited (the postmaster's reaped-children
    time), when the server runs on this machine and /proc shows it; else None."""

    def __init__(self, url: str):
        self.stat = None
        try:
            with psycopg.connect(url) as conn:
                backend = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
                with open(f"/proc/{backend}/stat") as f:  # while the backend lives
                    postmaster = int(f.read().rsplit(")", 1)[1].split()[1])
            self.stat = f"/proc/{postmaster}/stat"
            self.read()
        except (OSError, ValueError, IndexError):
            self.stat = None

    def read(self) -> float | None:
        if self.stat is None:
            return None
        time.sleep(0.2)  # let the postmaster reap the backends and parallel workers
        with open(self.stat) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")


def _cpu_self() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(url: str, repeats: int) -> dict:
    """Runs in the child process: alternate GROUP BY and payments(); figures as a dict.

    Besides wall time, the CPU seconds each side costs (server backends and parallel
    workers; this process) where they can be read: on a shared machine they vary far
    less than wall time, and on N cores the wall time cannot beat CPU / N.
    """
    import resource

    server_cpu = _ServerCpu(url)
    group_by_times, payments_times, peaks = [], [], []
    cpu = {"group_by_server": [], "payments_server": [], "payments_client": []}
    correct = True
    for _ in range(repeats):
        before = server_cpu.read()
        with psycopg.connect(url, autocommit=True) as conn:  # closed: its CPU gets counted
            started = time.perf_counter()
            reference = conn.execute(GROUP_BY).fetchall()
            group_by_times.append(time.perf_counter() - started)
        after = server_cpu.read()
        if before is not None:
            cpu["group_by_server"].append(after - before)

        idle_kb = _status_kb("VmRSS")
        reset = _reset_peak()
        before, client = server_cpu.read(), _cpu_self()
        started = time.perf_counter()
        result = aggregate.payments(url)
        payments_times.append(time.perf_counter() - started)
        cpu["payments_client"].append(_cpu_self() - client)
        peak_kb = _status_kb("VmHWM") if reset else None
        after = server_cpu.read()
        if before is not None:
            cpu["payments_server"].append(after - before)
        if peak_kb is None or idle_kb is None:  # no /proc: lifetime peak, an upper bound
            peak_kb, idle_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, idle_kb or 0
        peaks.append(max(0, peak_kb - idle_kb) / 1024)

        correct &= result == [{"user_id": u, "total_payment": t} for u, t in sorted(reference)]
        del result, reference
    return {"group_by_s": min(group_by_times), "payments_s": min(payments_times),
            "group_by_all_s": group_by_times, "payments_all_s": payments_times,
            "cpu_s": {k: (min(v) if v else None) for k, v in cpu.items()},
            "peak_rss_above_idle_mb": max(peaks), "correct": correct}


def _measure_in_subprocess(url: str, repeats: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "bench.aggregation", "--child", "--repeats", str(repeats)],
        env={**os.environ, "DATABASE_URL": url}, capture_output=True, text=True, check=True,
        timeout=600 + 120 * repeats)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(url: str | None = None, sizes=DEFAULT_SIZES, repeats: int = 3, *,
        users: int = DEFAULT_USERS, log=None) -> dict:
    """Seed each size, measure, and return the figures of scenario 5."""
    url = url or db.database_url()
    results = []
    for rows in sizes:
        _seed(url, rows, users)
        figures = _measure_in_subprocess(url, repeats)
        figures.update(
            rows=rows, user_ids_from_1_to=users,
            ratio=figures["payments_s"] / figures["group_by_s"],
            rows_per_s=rows / figures["payments_s"] if figures["payments_s"] else 0.0)
        results.append(figures)
        if log:
            log(_line(figures))
    with psycopg.connect(url) as conn:
        server = conn.execute("SHOW server_version").fetchone()[0]
        parallel = conn.execute("SHOW max_parallel_workers_per_gather").fetchone()[0]
    largest = max(results, key=lambda r: r["rows"]) if results else None
    return {
        "scenario": "aggregation",
        "method": "text COPY of SELECT user_id, total FROM orders over parallel connections "
                  "(ctid ranges, one exported snapshot), numpy bulk parsing, int64 sums",
        "parallelism": aggregate.default_parallelism(),
        "batch_rows": aggregate.BATCH_ROWS,
        "min_part_blocks": aggregate.MIN_PART_BLOCKS,
        "repeats": repeats,
        "server_version": server,
        "max_parallel_workers_per_gather": int(parallel),
        "cpu_count": os.cpu_count(),
        "sizes": results,
        "targets": {"ratio_at_largest": TARGET_RATIO, "peak_rss_above_idle_mb": TARGET_MEMORY_MB},
        "met": None if largest is None else {
            "ratio": largest["ratio"] <= TARGET_RATIO,
            "memory": all(r["peak_rss_above_idle_mb"] <= TARGET_MEMORY_MB for r in results),
            "correct": all(r["correct"] for r in results),
        },
    }


def _line(r: dict) -> str:
    return (f"{r['rows']:>11,} rows  GROUP BY {r['group_by_s']:7.3f} s  payments {r['payments_s']:7.3f} s"
            f"  ratio {r['ratio']:5.2f}  {r['rows_per_s'] / 1e6:6.2f} Mrows/s"
            f"  peak +{r['peak_rss_above_idle_mb']:6.1f} MB  {'ok' if r['correct'] else 'WRONG'}"
            + _cpu_text(r.get("cpu_s") or {}))


def _cpu_text(cpu: dict) -> str:
    if cpu.get("group_by_server") is None or cpu.get("payments_server") is None:
        return ""
    return (f"  CPU s: GROUP BY {cpu['group_by_server']:.2f}, payments server"
            f" {cpu['payments_server']:.2f} + client {cpu['payments_client']:.2f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.aggregation", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--users", type=int, default=DEFAULT_USERS)
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure(db.database_url(), args.repeats)))
        return 0
    sizes = [int(s.replace("_", "")) for s in args.sizes.split(",") if s]
    figures = run(None, sizes, args.repeats, users=args.users,
                  log=None if args.json else print)
    if args.json:
        print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
