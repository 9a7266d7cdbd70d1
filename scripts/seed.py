"""Create (and/or truncate) fake orders.

    python -m scripts.seed [--count N] [--users N] [--min-total A] [--max-total B]
                           [--truncate] [--seed S]

Without --count a random count from 1,000 to 5,000 is drawn. Same --seed, same data.
Small counts are generated row by row with Faker (seeded); large ones (over
FAKER_MAX rows) in vectorised blocks with numpy's seeded generator, written with
binary COPY, so 10 million rows take seconds of Python time rather than minutes.
Bad arguments exit with status 2 and a one-line message, before anything is written.
"""
from __future__ import annotations

import argparse
import random
import struct
import sys
import time
from datetime import datetime, timedelta, timezone

import numpy as np
import psycopg
from faker import Faker

from jobrunner import db
from jobrunner.migrate import migrate
from jobrunner.sqlfile import queries

Q = queries("orders")
FAKER_MAX = 100_000
BLOCK = 1_000_000
SUMMARY_USERS = 20
PG_EPOCH = datetime(2000, 1, 1, tzinfo=timezone.utc)
WINDOW = timedelta(days=365)
INT32_MAX = 2**31 - 1
MAX_COUNT = 100_000_000  # "up to tens of millions" of orders, with room to spare


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, status 2
        raise UsageError(message)


def _int(text: str) -> int:
    try:
        return int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = _Parser(prog="seed", description="Create or truncate fake orders.")
    p.add_argument("--count", type=_int, help="orders to create (default: random 1,000..5,000)")
    p.add_argument("--users", type=_int, default=5, help="user ids are drawn from 1..USERS (default 5)")
    p.add_argument("--min-total", type=_int, default=100, help="smallest total (default 100)")
    p.add_argument("--max-total", type=_int, default=1000, help="largest total (default 1000)")
    p.add_argument("--truncate", action="store_true", help="empty the table first (alone: only empty it)")
    p.add_argument("--seed", type=_int, help="seed for the random generators (same seed, same data)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.count is not None and not 0 <= args.count <= MAX_COUNT:
        raise UsageError(f"--count must be from 0 to {MAX_COUNT:,}, got {args.count}")
    if args.users < 1 or args.users > INT32_MAX:
        raise UsageError(f"--users must be from 1 to {INT32_MAX}, got {args.users}")
    if args.min_total < 0 or args.max_total > INT32_MAX:
        raise UsageError(f"totals must lie in 0..{INT32_MAX}")
    if args.min_total > args.max_total:
        raise UsageError(f"--min-total ({args.min_total}) is greater than --max-total ({args.max_total})")
    return args


def choose_count(args: argparse.Namespace) -> int:
    if args.count is not None:
        return args.count
    if args.truncate:  # `seed --truncate` alone only empties the table
        return 0
    return random.Random(args.seed).randint(1000, 5000)


def _faker_rows(args, count: int, now: datetime):
    fake = Faker()
    fake.seed_instance(args.seed if args.seed is not None else random.randrange(2**63))
    start = now - WINDOW
    for _ in range(count):
        yield (
            fake.random_int(1, args.users),
            fake.random_int(args.min_total, args.max_total),
            fake.date_time_between(start_date=start, end_date=now, tzinfo=timezone.utc),
        )


_ROW = np.dtype([
    ("ncols", ">i2"), ("l1", ">i4"), ("user_id", ">i4"), ("l2", ">i4"), ("total", ">i4"),
    ("l3", ">i4"), ("created_at", ">i8"),
])


def _binary_blocks(args, count: int, now: datetime):
    """Binary COPY payload in blocks of BLOCK rows (header first, trailer last)."""
    rng = np.random.default_rng(args.seed)
    now_us = int((now - PG_EPOCH).total_seconds() * 1_000_000)
    window_us = int(WINDOW.total_seconds() * 1_000_000)
    yield b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
    left = count
    while left:
        n = min(BLOCK, left)
        block = np.empty(n, dtype=_ROW)
        block["ncols"], block["l1"], block["l2"], block["l3"] = 3, 4, 4, 8
        block["user_id"] = rng.integers(1, args.users, size=n, endpoint=True)
        block["total"] = rng.integers(args.min_total, args.max_total, size=n, endpoint=True)
        block["created_at"] = now_us - rng.integers(0, window_us, size=n)
        yield block.tobytes()
        left -= n
    yield struct.pack(">h", -1)


def _progress(done: int, total: int, started: float) -> None:
    rate = done / max(time.monotonic() - started, 1e-9)
    width = 30
    filled = int(width * done / total) if total else width
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done:,}/{total:,} rows  {rate:,.0f} rows/s")
    if done >= total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def insert(conn: psycopg.Connection, args, count: int, *, progress: bool) -> None:
    now = datetime.now(timezone.utc).replace(microsecond=0)
    cur = conn.cursor()
    if count <= FAKER_MAX:
        with cur.copy(Q["copy_in_text"]) as copy:
            for row in _faker_rows(args, count, now):
                copy.write_row(row)
        return
    started, done = time.monotonic(), 0
    with cur.copy(Q["copy_in_binary"]) as copy:
        for chunk in _binary_blocks(args, count, now):
            copy.write(chunk)
            done += len(chunk) // _ROW.itemsize
            if progress:
                _progress(done, count, started)


def run(args: argparse.Namespace, url: str | None = None) -> dict:
    count = choose_count(args)
    url = url or db.database_url()
    migrate(url)
    with psycopg.connect(url) as conn:
        if args.truncate:
            conn.execute(Q["truncate"])
        insert(conn, args, count, progress=not args.quiet and count > FAKER_MAX)
        conn.commit()
        rows = conn.execute(Q["count"]).fetchone()[0]
        users = conn.execute(Q["per_user_summary"], {"limit": SUMMARY_USERS}).fetchall()
        distinct = conn.execute(Q["distinct_users"]).fetchone()[0] if len(users) == SUMMARY_USERS else len(users)
    return {"inserted": count, "rows": rows, "users": users, "distinct_users": distinct,
            "truncated": args.truncate}


def report(summary: dict) -> None:
    if summary["truncated"]:
        print("truncated orders")
    print(f"inserted {summary['inserted']:,} orders; orders now in the table: {summary['rows']:,}")
    if summary["users"]:
        print(f"{'user_id':>10} {'orders':>12} {'total':>16}")
        for user_id, orders, total in summary["users"]:
            print(f"{user_id:>10} {orders:>12,} {total:>16,}")
        more = summary["distinct_users"] - len(summary["users"])
        if more > 0:
            print(f"... and {more:,} more users")


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
    except UsageError as exc:
        print(f"seed: error: {exc}", file=sys.stderr)
        return 2
    report(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
