"""The payments aggregation against a real PostgreSQL, checked against SQL GROUP BY."""
from __future__ import annotations

import re

import asyncpg
import asyncio
import pytest

from jobrunner import aggregate, errors
from jobrunner.db import asyncpg_connect_kwargs
from jobrunner.sqlfile import queries

PARALLELISM = [1, 2, 3, 5]


def reference(conn) -> list[dict]:
    rows = conn.execute(
        "SELECT user_id, sum(total)::bigint FROM orders GROUP BY user_id ORDER BY user_id").fetchall()
    return [{"user_id": u, "total_payment": t} for u, t in rows]


def insert_random(conn, count: int, *, max_user: int, max_total: int, seed: float = 0.5) -> None:
    conn.execute("SELECT setseed(%s)", [seed])
    conn.execute(
        "INSERT INTO orders (user_id, total) SELECT floor(random() * %(u)s)::int + 1,"
        " floor(random() * (%(t)s::bigint + 1))::int FROM generate_series(1, %(n)s)",
        {"u": max_user, "t": max_total, "n": count})


def check(conn, db_url, parallelisms=PARALLELISM) -> list[dict]:
    want = reference(conn)
    for parallelism in parallelisms:
        # one block per part at least, so even small tables are split
        assert aggregate.payments(db_url, parallelism=parallelism, min_part_blocks=1) == want, parallelism
    assert aggregate.payments(db_url) == want  # the defaults
    return want


def test_empty_table(conn, db_url):
    assert check(conn, db_url) == []


def test_one_user_one_order(conn, db_url):
    conn.execute("INSERT INTO orders (user_id, total) VALUES (42, 6380)")
    assert check(conn, db_url) == [{"user_id": 42, "total_payment": 6380}]


def test_one_user_many_orders_sum_beyond_int4(conn, db_url):
    conn.execute("INSERT INTO orders (user_id, total) SELECT 7, 2147483647 FROM generate_series(1, 5000)")
    assert check(conn, db_url) == [{"user_id": 7, "total_payment": 5000 * 2147483647}]


def test_many_users_random(conn, db_url):
    insert_random(conn, 200_000, max_user=20_000, max_total=1000)
    want = check(conn, db_url)
    assert len(want) > 19_000
    assert all(type(r["user_id"]) is int and type(r["total_payment"]) is int for r in want)


def test_ids_across_the_int4_range_and_big_totals(conn, db_url):
    insert_random(conn, 60_000, max_user=2**31 - 2, max_total=2**31 - 1, seed=0.1)
    insert_random(conn, 60_000, max_user=300, max_total=2**31 - 1, seed=0.2)
    conn.execute("INSERT INTO orders (user_id, total) VALUES"
                 " (2147483647, 2147483647), (2147483647, 2147483647), (0, 0), (1, 2147483647)")
    want = check(conn, db_url)
    assert want[0] == {"user_id": 0, "total_payment": 0}
    assert want[-1]["user_id"] == 2**31 - 1 and want[-1]["total_payment"] >= 2**32 - 2
    assert max(r["total_payment"] for r in want) > 2**31


def test_negative_user_ids(conn, db_url):
    """user_id has no CHECK: negative ids, down to the int4 minimum, are summed too."""
    insert_random(conn, 20_000, max_user=50, max_total=1000, seed=0.3)
    conn.execute("UPDATE orders SET user_id = -user_id WHERE id % 3 = 0")
    conn.execute("INSERT INTO orders (user_id, total) VALUES"
                 " (-2147483648, 2147483647), (-2147483648, 0), (-1, 0), (2147483647, 1)")
    want = check(conn, db_url, [1, 3])
    assert want[0] == {"user_id": -2**31, "total_payment": 2**31 - 1}
    assert sum(r["user_id"] < 0 for r in want) > 40


def test_users_whose_orders_total_zero_are_listed(conn, db_url):
    conn.execute("INSERT INTO orders (user_id, total) VALUES (1, 0), (1, 0), (2, 5), (3, 0)")
    assert check(conn, db_url) == [{"user_id": 1, "total_payment": 0},
                                   {"user_id": 2, "total_payment": 5},
                                   {"user_id": 3, "total_payment": 0}]


def test_dead_tuples_and_empty_pages(conn, db_url):
    insert_random(conn, 150_000, max_user=5_000, max_total=10_000)
    conn.execute("ALTER TABLE orders SET (autovacuum_enabled = false)")
    # whole pages emptied at the start, middle and end, plus scattered dead tuples
    conn.execute("DELETE FROM orders WHERE id <= 20000 OR id BETWEEN 60000 AND 90000 OR id > 140000"
                 " OR id % 7 = 0")
    check(conn, db_url)
    conn.execute("VACUUM orders")
    check(conn, db_url)
    conn.execute("UPDATE orders SET total = total + 1 WHERE id % 5 = 0")  # new versions at the end
    insert_random(conn, 10_000, max_user=5_000, max_total=10_000, seed=0.9)  # refills freed space
    check(conn, db_url)


def test_more_connections_than_pages(conn, db_url):
    conn.execute("INSERT INTO orders (user_id, total) VALUES (1, 1), (2, 2), (1, 3)")
    assert aggregate.payments(db_url, parallelism=16, min_part_blocks=1) == [
        {"user_id": 1, "total_payment": 4}, {"user_id": 2, "total_payment": 2}]


def test_parallel_parts_meet_exactly_at_block_boundaries(conn, db_url):
    """Rows sit in the first and last slot of every page; each part boundary falls on a
    page holding rows, so a row read twice or missed at a boundary changes the sums."""
    insert_random(conn, 30_000, max_user=3, max_total=100)
    nblocks = conn.execute("SELECT pg_relation_size('orders') / current_setting('block_size')::int").fetchone()[0]
    assert nblocks > 16
    for parallelism in range(2, 10):
        assert aggregate.payments(db_url, parallelism=parallelism, min_part_blocks=1) == reference(conn), parallelism


def test_parts_share_one_snapshot(conn, db_url, monkeypatch):
    """A commit landing while the parts are being read must not show up in some parts
    and not in others: every part reads in the snapshot exported by the first."""
    insert_random(conn, 50_000, max_user=100, max_total=100)
    before = reference(conn)
    real_copy_part = aggregate._copy_part
    calls = 0

    async def copy_part_after_a_concurrent_write(db, query, acc, batch_bytes):
        nonlocal calls
        calls += 1
        if calls == 1:  # the snapshot is taken; now another session commits changes
            conn.execute("UPDATE orders SET total = total + 1000")
            conn.execute("INSERT INTO orders (user_id, total) SELECT 1, 5 FROM generate_series(1, 1000)")
        return await real_copy_part(db, query, acc, batch_bytes)

    monkeypatch.setattr(aggregate, "_copy_part", copy_part_after_a_concurrent_write)
    assert aggregate.payments(db_url, parallelism=4, min_part_blocks=1) == before
    assert calls == 4
    monkeypatch.setattr(aggregate, "_copy_part", real_copy_part)
    assert aggregate.payments(db_url, parallelism=4, min_part_blocks=1) == reference(conn) != before


def test_report_queries_do_not_aggregate_in_sql():
    q = queries("report")
    assert q["payments_rows"] == "SELECT user_id, total FROM orders"
    for name in ("payments_rows", "payments_rows_range"):
        text = re.sub(r"--[^\n]*", "", q[name]).strip().lower()
        assert text.startswith("select user_id, total from orders"), name
        assert not re.search(r"\b(sum|count|avg|min|max|group\s+by|over|distinct|having)\b", text), name


def test_unreachable_database_raises_database_unavailable(tmp_path):
    with pytest.raises(errors.DatabaseUnavailable):
        aggregate.payments(f"postgresql://nobody@/nothing?host={tmp_path}&port=1")


def test_asyncpg_kwargs_connect_to_the_test_database(db_url):
    async def current_database():
        conn = await asyncpg.connect(**asyncpg_connect_kwargs(db_url))
        try:
            return await conn.fetchval("SELECT current_database()")
        finally:
            await conn.close()

    from psycopg.conninfo import conninfo_to_dict
    assert asyncio.run(current_database()) == conninfo_to_dict(db_url)["dbname"]


@pytest.mark.parametrize("query", [
    "SELECT NULL::int AS user_id, 1 AS total FROM generate_series(1, 9)",
    "SELECT g AS user_id, NULLIF(g % 3, 0) AS total FROM generate_series(1, 100) g",
    "SELECT 1::int AS user_id, 2147483648::bigint AS total",
    "SELECT 1::int AS user_id, 2::int AS total, 3::int AS extra",
    "SELECT 1::int AS user_id",
    "SELECT 1::int AS user_id, 2.5::numeric AS total",
    "SELECT 1::int AS user_id, 'x'::text AS total",
])
def test_copy_of_other_shapes_is_refused(db_url, query):
    async def copy():
        conn = await asyncpg.connect(**asyncpg_connect_kwargs(db_url))
        try:
            await aggregate._copy_part(conn, query, aggregate._Accumulator(), 8)
        finally:
            await conn.close()

    # An error raised inside asyncpg's output callback used to hang the COPY: time out.
    with pytest.raises(errors.ReportDataError):
        asyncio.run(asyncio.wait_for(copy(), 60))


def _backends(conn) -> set[int]:
    """Other sessions connected to this test's database (the aggregation's)."""
    return {r[0] for r in conn.execute(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
        " AND pid <> pg_backend_pid() AND backend_type = 'client backend'").fetchall()}


def test_connections_are_kept_across_calls_and_replaced_when_they_die(conn, db_url):
    conn.execute("INSERT INTO orders (user_id, total) VALUES (1, 1), (2, 2), (1, 3)")
    want = reference(conn)
    assert aggregate.payments(db_url, parallelism=1) == want
    pooled = _backends(conn)
    assert len(pooled) == 1
    assert aggregate.payments(db_url, parallelism=1) == want
    assert _backends(conn) == pooled       # the same session served the second call
    for pid in pooled:                     # a restart, as far as these sessions go
        conn.execute("SELECT pg_terminate_backend(%s, 10000)", (pid,))
    assert aggregate.payments(db_url, parallelism=1) == want
    assert aggregate.payments(db_url, parallelism=3, min_part_blocks=1) == want
    assert _backends(conn) and not _backends(conn) & pooled


def test_concurrent_calls_share_a_small_pool_without_deadlock(conn, db_url, monkeypatch):
    """More calls than connections, each wanting several: every call finishes, with the
    right sums, and the process never holds more than the pool's size."""
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setattr(aggregate, "POOL_SIZE", 3)   # read when this URL's pool is made
    insert_random(conn, 30_000, max_user=500, max_total=1000)
    want = reference(conn)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(
            lambda _: aggregate.payments(db_url, parallelism=3, min_part_blocks=1), range(16)))
    assert all(r == want for r in results)
    assert 1 <= len(_backends(conn)) <= 3


def test_a_forked_child_uses_connections_of_its_own(conn, db_url):
    import multiprocessing

    conn.execute("INSERT INTO orders (user_id, total) VALUES (5, 7)")
    want = reference(conn)
    assert aggregate.payments(db_url, parallelism=1) == want
    parent_sessions = _backends(conn)
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as child:
        assert child.apply(aggregate.payments, (db_url,), {"parallelism": 1}) == want
    assert aggregate.payments(db_url, parallelism=1) == want
    assert parent_sessions <= _backends(conn)   # the parent's session survived the child


def test_a_pooled_connection_found_dead_on_first_use_is_replaced_in_the_same_call(
        conn, db_url, monkeypatch):
    """The session dies while the aggregation's event loop is busy, so the next call
    sends its first statement before the loop has read the server's goodbye: the call
    must start over on a new connection rather than fail."""
    import time

    conn.execute("INSERT INTO orders (user_id, total) VALUES (3, 4)")
    want = reference(conn)
    assert aggregate.payments(db_url, parallelism=1) == want
    stale = []
    real_once = aggregate._payments_once

    async def spy(*args, **kwargs):
        try:
            return await real_once(*args, **kwargs)
        except aggregate._StaleConnection:
            stale.append(True)
            raise

    monkeypatch.setattr(aggregate, "_payments_once", spy)
    aggregate._get_runner().loop.call_soon_threadsafe(time.sleep, 1.0)  # the loop is busy
    for pid in _backends(conn):
        conn.execute("SELECT pg_terminate_backend(%s, 10000)", (pid,))
    assert aggregate.payments(db_url, parallelism=1) == want
    assert stale == [True]


def test_a_truncate_queued_mid_read_does_not_deadlock_the_parts(conn, db_url, pg_server, monkeypatch):
    """The first connection holds its lock while a TRUNCATE queues behind it; the other
    parts must not queue behind the TRUNCATE forever (a cycle through our process that
    PostgreSQL cannot see): they give up, the read fails as retryable, the TRUNCATE runs."""
    import threading
    import time

    import psycopg

    insert_random(conn, 20_000, max_user=10, max_total=100)
    truncate_done = threading.Event()

    def truncate():
        with psycopg.connect(db_url, autocommit=True) as other:
            other.execute("TRUNCATE orders")
        truncate_done.set()

    real_split = aggregate.split_blocks
    started: list[threading.Thread] = []
    calls: list[None] = []

    def split_then_queue_a_truncate(*args, **kwargs):
        calls.append(None)
        # the first call chooses parallel parts; by the second the first connection
        # holds its lock and snapshot
        if len(calls) == 2:
            thread = threading.Thread(target=truncate, daemon=True)
            thread.start()
            started.append(thread)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:  # until the TRUNCATE waits on the lock
                waiting = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND query = 'TRUNCATE orders' AND wait_event_type = 'Lock'").fetchone()[0]
                if waiting:
                    break
                time.sleep(0.05)
        return real_split(*args, **kwargs)

    monkeypatch.setattr(aggregate, "split_blocks", split_then_queue_a_truncate)
    outcome: list = []

    def run():
        try:
            outcome.append(aggregate.payments(db_url, parallelism=4, min_part_blocks=1))
        except Exception as exc:  # noqa: BLE001 - inspected below
            outcome.append(exc)

    caller = threading.Thread(target=run, daemon=True)
    caller.start()
    caller.join(60)
    try:
        assert not caller.is_alive(), "the aggregation hung behind the queued TRUNCATE"
        assert started, "the TRUNCATE was never queued"
        assert isinstance(outcome[0], errors.DatabaseUnavailable), outcome
        assert truncate_done.wait(30), "the TRUNCATE never ran"
        monkeypatch.setattr(aggregate, "split_blocks", real_split)
        assert aggregate.payments(db_url, parallelism=4, min_part_blocks=1) == []
    finally:
        with pg_server.admin() as admin:  # never leave a hung session behind
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                          " WHERE query = 'TRUNCATE orders' AND pid <> pg_backend_pid()")
