"""Failed-jobs commands of the `jobrunner` CLI (registered in jobrunner/cli.py COMMANDS).

    jobrunner failed [--queue Q] [--kind K] [--limit N] [--json]
    jobrunner retry ID
    jobrunner retry --dead [--queue Q] [--kind K]
    jobrunner cancel ID
    jobrunner discard ID
    jobrunner stats [--json]

Exit statuses: 0 done; 1 unknown job id, or a job whose state does not allow the change
(e.g. retrying a running job); 2 bad input.
"""
from __future__ import annotations

import json
from datetime import datetime, timezone

from . import admin, errors


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def _one_line(text: str | None, width: int = 60) -> str:
    if not text:
        return ""
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def _when(value: datetime | None) -> str:
    """Relative to now: `in 3s`, `5m ago`; empty for None."""
    if value is None:
        return ""
    seconds = (value - datetime.now(timezone.utc)).total_seconds()
    word = _age(abs(seconds))
    return f"in {word}" if seconds > 0 else f"{word} ago"


def _age(seconds: float) -> str:
    """`42s`, `3m`, `5h`, `2d` (whole units, rounded down)."""
    seconds = int(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _dump(data) -> None:
    print(json.dumps(data, indent=2, default=str))


def _job_id(text: str) -> int:
    return admin.check_job_id(text)


# --- failed ------------------------------------------------------------------------------

def register_failed(sub) -> None:
    p = sub.add_parser("failed", help="jobs that failed at least once and have not succeeded")
    p.add_argument("--queue", help="only this queue")
    p.add_argument("--kind", help="only this task kind")
    p.add_argument("--limit", type=int, default=1000, help="at most this many rows (default 1000)")
    p.add_argument("--json", action="store_true", help="a JSON array (for scripts)")
    p.set_defaults(func=cmd_failed)


def cmd_failed(args) -> int:
    rows = admin.failed_jobs(queue_name=args.queue, kind=args.kind, limit=args.limit)
    if args.json:
        _dump([admin.row_json(r) for r in rows])
        return 0
    if not rows:
        print("no failed jobs")
        return 0
    print(_table(
        ["ID", "QUEUE", "KIND", "STATE", "ATTEMPTS", "ERRORS", "LAST FAILED", "NEXT RUN", "LAST ERROR"],
        [[str(r["id"]), r["queue"], r["kind"], r["state"], f"{r['attempts']}/{r['max_attempts']}",
          str(r["errors_count"]), _when(r["last_failed_at"]), _when(r["next_run_at"]),
          _one_line(r["last_error"])] for r in rows]))
    print(f"({len(rows)} job{'s' if len(rows) != 1 else ''})")
    return 0


# --- retry -------------------------------------------------------------------------------

def register_retry(sub) -> None:
    p = sub.add_parser("retry", help="put a dead or failed job (or every dead job) back to queued")
    p.add_argument("id", nargs="?", help="the job's id")
    p.add_argument("--dead", action="store_true", help="retry every dead job (see --queue, --kind)")
    p.add_argument("--queue", help="with --dead: only this queue")
    p.add_argument("--kind", help="with --dead: only this task kind")
    p.set_defaults(func=cmd_retry)


def cmd_retry(args) -> int:
    if args.dead:
        if args.id is not None:
            raise errors.InvalidInput("give a job id or --dead, not both")
        ids = admin.retry_dead(queue_name=args.queue, kind=args.kind)
        shown = ", ".join(map(str, ids[:20])) + (", ..." if len(ids) > 20 else "")
        print(f"retried {len(ids)} dead job{'s' if len(ids) != 1 else ''}" + (f": {shown}" if ids else ""))
        return 0
    if args.id is None:
        raise errors.InvalidInput("give a job id, or --dead to retry every dead job")
    if args.queue is not None or args.kind is not None:
        raise errors.InvalidInput("--queue and --kind go with --dead")
    job = admin.retry(_job_id(args.id))
    print(f"job {job.id} queued: attempt {job.attempts + 1} of {job.max_attempts} runs now")
    return 0


# --- cancel, discard -----------------------------------------------------------------------

def register_cancel(sub) -> None:
    p = sub.add_parser("cancel", help="cancel a job (a running one is asked to stop)")
    p.add_argument("id", help="the job's id")
    p.set_defaults(func=cmd_cancel)


def cmd_cancel(args) -> int:
    job_id = _job_id(args.id)
    job = admin.cancel(job_id)
    if job.state == "cancelled":
        print(f"job {job.id} cancelled")
    elif job.state == "running":
        print(f"job {job.id} is running: cancel requested (its worker stops it if the task checks)")
    else:
        print(f"job {job.id} already {job.state}: unchanged")
    return 0


def register_discard(sub) -> None:
    p = sub.add_parser("discard", help="delete a finished (succeeded, dead, cancelled) job")
    p.add_argument("id", help="the job's id")
    p.set_defaults(func=cmd_discard)


def cmd_discard(args) -> int:
    job = admin.discard(_job_id(args.id))
    print(f"job {job.id} ({job.state}) discarded")
    return 0


# --- stats -------------------------------------------------------------------------------

def register_stats(sub) -> None:
    p = sub.add_parser("stats", help="jobs per queue and state, with the oldest one's age")
    p.add_argument("--json", action="store_true", help="a JSON array (for scripts)")
    p.set_defaults(func=cmd_stats)


def cmd_stats(args) -> int:
    rows = admin.stats()
    if args.json:
        _dump(rows)
        return 0
    if not rows:
        print("no jobs")
        return 0
    print(_table(["QUEUE", "STATE", "COUNT", "OLDEST"],
                 [[r["queue"], r["state"], str(r["count"]), _age(r["oldest_age_seconds"])]
                  for r in rows]))
    return 0


COMMANDS = [register_failed, register_retry, register_cancel, register_discard, register_stats]
