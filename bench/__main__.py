"""`make bench` / `python -m bench [--quick] [--only a,b] [--workers N] [--concurrency N]`.

Runs the benchmark scenarios against the PostgreSQL server in use (DATABASE_URL, or
the embedded server), each in a scratch database of its own (created, migrated and
dropped again: the data of the database in use is never touched), prints a table and
writes bench/results/latest.json (latest-quick.json for --quick; and the table as
Markdown beside it, latest.md): every figure, its
target and whether it was met, and the machine (cores, memory, CPU, PostgreSQL version
and settings, load average before and after each scenario).

--quick runs every scenario at small sizes (under a minute): a smoke run for CI that
fails only on errors, never on a missed target.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

from jobrunner import config, db

from . import burndown, enqueue, http_load, longpoll, pickup
from .common import Settings, load_average, machine, metric, scratch_database

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _aggregation(url: str, s: Settings) -> dict:
    from . import aggregation

    sizes = (1_000, 20_000) if s.quick else aggregation.DEFAULT_SIZES
    figures = aggregation.run(url, sizes, repeats=1 if s.quick else 3,
                              log=lambda line: s.log("  " + line))
    largest = max(figures["sizes"], key=lambda r: r["rows"])
    metrics = [metric(f"ratio to GROUP BY at {r['rows']:,} rows", r["ratio"], "x")
               for r in figures["sizes"] if r is not largest]
    metrics += [
        metric(f"ratio to GROUP BY at {largest['rows']:,} rows, users 1..{figures['sizes'][0]['user_ids_from_1_to']:,}",
               largest["ratio"], "x",
               target=aggregation.TARGET_RATIO, op="<="),
        metric(f"rows/s at {largest['rows']:,} rows", largest["rows_per_s"], "rows/s"),
        metric("peak memory above idle (largest of all sizes)",
               max(r["peak_rss_above_idle_mb"] for r in figures["sizes"]), "MB",
               target=aggregation.TARGET_MEMORY_MB, op="<="),
        metric("equal to GROUP BY at every size", int(all(r["correct"] for r in figures["sizes"])),
               "bool", target=1, op=">="),
    ]
    if not s.quick:
        # The same largest size with many users, for contrast (no target).
        many = aggregation.run(url, (largest["rows"],), repeats=3, users=aggregation.MANY_USERS,
                               log=lambda line: s.log("  " + line))
        other = many["sizes"][0]
        figures["many_users"] = many
        metrics += [
            metric(f"ratio to GROUP BY at {other['rows']:,} rows, {aggregation.MANY_USERS:,} users",
                   other["ratio"], "x"),
            metric("equal to GROUP BY with many users", int(other["correct"]), "bool",
                   target=1, op=">="),
        ]
    figures["metrics"] = metrics
    return figures


SCENARIOS = {
    "burn-down": burndown.run,
    "enqueue": enqueue.run,
    "pickup": pickup.run,
    "long-poll": longpoll.run,
    "aggregation": _aggregation,
    "http": http_load.run,
}


def _fmt(value, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "bool":
        return "yes" if value else "no"
    if unit in ("jobs/s", "rows/s", "req/s"):
        return f"{value:,.0f} {unit}"
    if unit == "x":
        return f"{value:.2f}x"
    if isinstance(value, float):
        return f"{value:,.2f} {unit}"
    return f"{value:,} {unit}"


def table(report: dict) -> str:
    rows = [("scenario", "figure", "value", "target", "")]
    for sc in report["scenarios"]:
        name = sc.get("scenario") or sc["name"]
        if sc["status"] != "ok":
            rows.append((name, sc["status"], (sc.get("reason") or "").splitlines()[0][:100], "", ""))
            continue
        for m in sc["metrics"]:
            target = f"{m['op']} {_fmt(m['target'], m['unit'])}" if "target" in m else ""
            verdict = "" if "target" not in m else ("pass" if m["met"] else "MISS")
            rows.append((name, m["metric"], _fmt(m["value"], m["unit"]), target, verdict))
            name = ""
    widths = [max(len(str(r[i])) for r in rows) for i in range(5)]
    lines = []
    for i, r in enumerate(rows):
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown(report: dict) -> str:
    """The figures as a Markdown table (for docs/benchmarks.md)."""
    m = report["machine"]
    pg = m["postgres"]
    lines = [
        f"Run of {report['date']}{' (quick)' if report['quick'] else ''}: {m['cores']} cores "
        f"({m['cpu_model']}), {m['memory_mb']:,} MB, PostgreSQL {pg['version']} ({pg['where']}; "
        + ", ".join(f"{k}={v}" for k, v in sorted(pg["settings"].items())) + "); "
        f"load average {report['load_average_at_start']} at the start.",
        "",
        "| scenario | figure | value | target | |",
        "| --- | --- | --- | --- | --- |",
    ]
    for sc in report["scenarios"]:
        name = sc.get("scenario") or sc["name"]
        if sc["status"] != "ok":
            reason = (sc.get("reason") or "").splitlines()[0][:100] if sc.get("reason") else ""
            lines.append(f"| {name} | {sc['status']} | {reason} | | |")
            continue
        for metric_ in sc["metrics"]:
            target = f"{metric_['op']} {_fmt(metric_['target'], metric_['unit'])}" if "target" in metric_ else ""
            verdict = "" if "target" not in metric_ else ("pass" if metric_["met"] else "**miss**")
            lines.append(f"| {name} | {metric_['metric']} | {_fmt(metric_['value'], metric_['unit'])} "
                         f"| {target} | {verdict} |")
            name = ""
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes, under a minute (CI)")
    p.add_argument("--only", help=f"comma-separated scenarios of: {', '.join(SCENARIOS)}")
    p.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--concurrency", type=int, default=16,
                   help="execution slots per worker process (default 16)")
    p.add_argument("--naive-slots", type=int, default=4,
                   help="slots (connections) per naive baseline process (default 4)")
    p.add_argument("--loadgen", choices=("auto", "wrk", "python"), default="auto",
                   help="HTTP load generator (auto: wrk if installed or installable, else python)")
    p.add_argument("--web-concurrency", type=int, default=0,
                   help="API processes in the HTTP scenario (default: one per core)")
    p.add_argument("--profile", metavar="DIR",
                   help="record py-spy profiles (speedscope JSON) of the API and worker "
                        "processes into DIR while they are measured")
    p.add_argument("--out", help="JSON file to write (default bench/results/latest.json, "
                   "latest-quick.json with --quick)")
    args = p.parse_args(argv)
    if os.environ.get("QUICK", "").lower() in ("1", "yes", "true"):
        args.quick = True
    chosen = list(SCENARIOS) if not args.only else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in SCENARIOS]
    if unknown:
        p.error(f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")

    where = "DATABASE_URL" if config.env_str("DATABASE_URL") else "embedded"
    base_url = db.database_url()
    settings = Settings(quick=args.quick, workers=args.workers, concurrency=args.concurrency,
                        log=lambda line: print(line, flush=True),
                        extra={"naive_slots": args.naive_slots, "loadgen": args.loadgen,
                               "web_concurrency": args.web_concurrency,
                               "profile": args.profile})
    started = time.time()
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick,
        "machine": machine(base_url, where),
        "settings": {"workers": args.workers, "concurrency": args.concurrency,
                     "naive_slots": args.naive_slots, "loadgen": args.loadgen},
        "load_average_at_start": load_average(),
        "scenarios": [],
    }
    print(f"bench{' (quick)' if args.quick else ''}: {report['machine']['cores']} cores, "
          f"PostgreSQL {report['machine']['postgres']['version']} ({where}), "
          f"load {report['load_average_at_start']}", flush=True)
    failed = False
    for name in chosen:
        print(f"== {name}", flush=True)
        entry: dict = {"name": name, "load_average_before": load_average()}
        t0 = time.perf_counter()
        try:
            with scratch_database(base_url) as url:
                result = SCENARIOS[name](url, settings)
            entry.update(result)
            entry.setdefault("status", "ok")
        except Exception as exc:  # noqa: BLE001 - one scenario's error must not hide the others
            failed = True
            entry.update(status="error", reason=f"{type(exc).__name__}: {exc}"[:500],
                         traceback=traceback.format_exc())
            print(traceback.format_exc(), file=sys.stderr, flush=True)
        entry["seconds"] = time.perf_counter() - t0
        entry["load_average_after"] = load_average()
        report["scenarios"].append(entry)
    report["total_seconds"] = time.time() - started

    out = Path(args.out) if args.out else RESULTS_DIR / ("latest-quick.json" if args.quick else "latest.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    print()
    print(table(report))
    misses = [m for sc in report["scenarios"] if sc["status"] == "ok"
              for m in sc["metrics"] if m.get("met") is False]
    print(f"\n{len(misses)} target(s) missed; {report['total_seconds']:.0f} s; "
          f"load {load_average()}; written to {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
