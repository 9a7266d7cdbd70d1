"""The `jobrunner` command (also `python -m jobrunner`).

    jobrunner worker [--queues a,b] [--concurrency N] [--poll-interval S] [--lease S]
                     [--grace S] [--no-listen] [--tasks mod1,mod2] [--prune-older-than 7d]
                     [--metrics-port N] [--metrics-addr HOST]
    jobrunner prune --older-than 7d [--batch-size N]
    jobrunner enqueue KIND [--args JSON] [--count N] [--queue Q] [--priority P]
                     [--delay S] [--max-attempts N]
    jobrunner failed [--json] | retry ID | retry --dead [--queue Q] [--kind K] | cancel ID
                     | discard ID | stats [--json]      (jobrunner/cli_failed.py)

Each subcommand is a `register_*(subparsers)` function below that adds its parser and
sets `func`; add new ones to COMMANDS (a command may live in its own module). Exit
statuses: 0 ok, 1 not found / failed, 2 bad input (argparse's convention).
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import signal
import sys
import threading
from collections.abc import Callable

import psycopg

from . import config, db, errors


def _duration(text: str) -> float:
    from .worker import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(kind, maximum: float | None = None):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not value > 0:   # also NaN
            raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
        if maximum is not None and not value <= maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum:,}: {text!r}")
        return value
    return parse


MAX_ENQUEUE_COUNT = 10_000_000


def _setup_logging() -> None:
    level = (config.env_str("LOG_LEVEL", "info") or "info").upper()
    logging.basicConfig(level=getattr(logging, level, logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")


# --- worker ------------------------------------------------------------------------------

def register_worker(sub) -> None:
    p = sub.add_parser("worker", help="run a worker (claims and runs jobs until SIGTERM/SIGINT)")
    p.add_argument("--queues", help="comma-separated queues, in the order they are served "
                   "(env JOBRUNNER_QUEUES, default: default)")
    p.add_argument("--concurrency", type=_positive(int),
                   help="execution slots (env JOBRUNNER_CONCURRENCY, default 8)")
    p.add_argument("--poll-interval", type=_positive(float),
                   help="seconds between polls when no notification arrives "
                        "(env JOBRUNNER_POLL_INTERVAL, default 1)")
    p.add_argument("--lease", type=_positive(float),
                   help="seconds a claim lasts without heartbeat; a dead worker's jobs are "
                        "taken over after it (env JOBRUNNER_LEASE, default 30)")
    p.add_argument("--grace", type=float,
                   help="seconds running jobs get to finish on SIGTERM (env JOBRUNNER_GRACE, "
                        "default 30)")
    p.add_argument("--no-listen", action="store_true",
                   help="poll only, no LISTEN (e.g. behind PgBouncer in transaction mode; "
                        "env JOBRUNNER_LISTEN=0)")
    p.add_argument("--tasks", help="comma-separated modules to import for their @task "
                   "functions (env JOBRUNNER_TASK_MODULES)")
    p.add_argument("--prune-older-than", type=_duration,
                   help="also prune finished jobs older than this, hourly (e.g. 7d; env "
                        "JOBRUNNER_PRUNE_OLDER_THAN)")
    p.add_argument("--metrics-port", type=int,
                   help="serve this worker's Prometheus metrics at http://ADDR:PORT/metrics "
                        "(env JOBRUNNER_METRICS_PORT; default: off)")
    p.add_argument("--metrics-addr",
                   help="address of the metrics server (env JOBRUNNER_METRICS_ADDR, default "
                        "127.0.0.1)")
    p.set_defaults(func=cmd_worker)


def cmd_worker(args) -> int:
    import os

    # A worker process serves its own figures (single-process mode): an inherited
    # PROMETHEUS_MULTIPROC_DIR (the API's) must not be in effect when prometheus_client
    # is first imported (by .worker).
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    from .worker import Worker, WorkerConfig

    modules = args.tasks or config.env_str("JOBRUNNER_TASK_MODULES") or ""
    for name in filter(None, (m.strip() for m in modules.split(","))):
        importlib.import_module(name)
    queues = tuple(q.strip() for q in args.queues.split(",") if q.strip()) if args.queues else None
    try:
        cfg = WorkerConfig.from_env(
            queues=queues, concurrency=args.concurrency, poll_interval=args.poll_interval,
            lease=args.lease, grace=args.grace, prune_older_than=args.prune_older_than,
            listen=False if args.no_listen else None)
        worker = Worker(cfg=cfg)
    except ValueError as exc:
        raise errors.InvalidInput(str(exc)) from None

    def on_signal(signum, frame):
        if worker.stopping:
            logging.getLogger("jobrunner.worker").warning("second signal: stopping now")
            worker.stop(immediate=True)
        else:
            worker.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        metrics_port = args.metrics_port if args.metrics_port is not None else \
            config.env_int("JOBRUNNER_METRICS_PORT", 0)
    except ValueError:
        raise errors.InvalidInput("JOBRUNNER_METRICS_PORT must be a port number") from None
    if metrics_port:
        from . import metrics

        if not 0 < metrics_port < 65536:
            raise errors.InvalidInput(f"--metrics-port must be from 1 to 65535, got {metrics_port}")
        addr = args.metrics_addr or config.env_str("JOBRUNNER_METRICS_ADDR", "127.0.0.1")
        try:
            metrics.serve(metrics_port, addr)
        except OSError as exc:
            raise errors.InvalidInput(f"cannot serve metrics on {addr}:{metrics_port}: {exc}") from None
        logging.getLogger("jobrunner.worker").info(
            "metrics at http://%s:%d/metrics", addr, metrics_port)
    # The worker runs on its own thread and the main thread only waits: signal handlers
    # run on the main thread, which then never holds a lock a handler needs (Event.set).
    failure: list[BaseException] = []

    def run() -> None:
        try:
            worker.run()
        except BaseException as exc:  # noqa: BLE001 - reported below
            failure.append(exc)
            logging.getLogger("jobrunner.worker").exception("worker crashed")

    thread = threading.Thread(target=run, name="jobrunner-dispatcher")
    thread.start()
    while thread.is_alive():
        thread.join(0.5)
    return 1 if failure else 0


# --- prune -------------------------------------------------------------------------------

def register_prune(sub) -> None:
    p = sub.add_parser("prune", help="delete finished jobs (and their results) older than an age")
    p.add_argument("--older-than", type=_duration, required=True, help="e.g. 7d, 12h, 30m")
    p.add_argument("--batch-size", type=_positive(int), default=5000)
    p.set_defaults(func=cmd_prune)


def cmd_prune(args) -> int:
    from . import queue

    with db.connect(autocommit=True, connect_timeout=10) as conn:
        deleted = queue.prune(args.older_than, batch_size=args.batch_size, conn=conn)
    print(f"pruned {deleted} finished jobs")
    return 0


# --- enqueue -----------------------------------------------------------------------------

def register_enqueue(sub) -> None:
    p = sub.add_parser("enqueue", help="enqueue jobs of one kind")
    p.add_argument("kind", help="task name, e.g. jobrunner.noop")
    p.add_argument("--args", default="{}", help="JSON args of each job (default {})")
    p.add_argument("--count", type=_positive(int, MAX_ENQUEUE_COUNT), default=1,
                   help=f"how many (bulk insert; at most {MAX_ENQUEUE_COUNT:,})")
    p.add_argument("--queue", default="default")
    p.add_argument("--priority", type=int, default=0, help="lower runs first")
    p.add_argument("--delay", type=_duration, help="run no earlier than this from now")
    p.add_argument("--max-attempts", type=_positive(int))
    p.set_defaults(func=cmd_enqueue)


def cmd_enqueue(args) -> int:
    from . import queue

    try:
        job_args = json.loads(args.args)
    except json.JSONDecodeError as exc:
        raise errors.InvalidInput(f"--args is not JSON: {exc}") from None
    common = dict(queue=args.queue, priority=args.priority, delay=args.delay,
                  max_attempts=args.max_attempts)
    with db.connect(autocommit=True, connect_timeout=10) as conn:
        if args.count == 1:
            job = queue.enqueue(args.kind, job_args, conn=conn, **common)
            print(json.dumps({"id": job.id, "state": job.state}))
        else:
            ids = queue.enqueue_many(args.kind, [job_args] * args.count, conn=conn, **common)
            print(json.dumps({"count": len(ids), "first_id": ids[0], "last_id": ids[-1]}))
    return 0


# --- main --------------------------------------------------------------------------------

COMMANDS: list[Callable] = [register_worker, register_prune, register_enqueue]

# Failed jobs: failed, retry, cancel, discard, stats (jobrunner/cli_failed.py).
from . import cli_failed  # noqa: E402

COMMANDS += cli_failed.COMMANDS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jobrunner", description="jobrunner: a Postgres-only job queue")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in COMMANDS:
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging()
    try:
        return args.func(args)
    except errors.InvalidInput as exc:
        print(f"jobrunner: error: {exc}", file=sys.stderr)
        return 2
    except psycopg.DataError as exc:
        # A value the database refuses (the input checks should have caught it first).
        print(f"jobrunner: error: invalid input: {str(exc).strip().splitlines()[0]}",
              file=sys.stderr)
        return 2
    except errors.JobrunnerError as exc:
        print(f"jobrunner: error: {exc}", file=sys.stderr)
        return 1
    except (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedFunction) as exc:
        print(f"jobrunner: error: the database is not migrated ({str(exc).strip()}); run "
              f"`make migrate` or `python -m jobrunner.migrate`", file=sys.stderr)
        return 1
    except psycopg.OperationalError as exc:
        print(f"jobrunner: error: the database is unavailable: {str(exc).strip()}",
              file=sys.stderr)
        return 1
