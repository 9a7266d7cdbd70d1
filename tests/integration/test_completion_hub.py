"""The API's completion hub (api/completion.py) against a real database: one LISTEN
connection, one read per completed job for all its waiters, recovery of notifications
lost while the listener was disconnected, and answering waiters at shutdown."""
from __future__ import annotations

import asyncio
from collections import Counter

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from api import report_jobs
from api.completion import CompletionHub
from api.db import Database
from jobrunner import queue

WORKER = "test-worker"


def _finish(conn: psycopg.Connection, job_id: int, result=None) -> None:
    """Claim and complete the (only) queued job as a worker would."""
    claimed = queue.claim(conn, queue="default", limit=10, worker_id=WORKER, lease=30)
    assert [c.id for c in claimed] == [job_id]
    assert queue.complete(conn, WORKER, [(job_id, claimed[0].attempts, result)]) == {job_id}


class Hub:
    """A started hub on its own pool, whose reads are counted per job id."""

    def __init__(self, url: str, **kwargs) -> None:
        self.db = Database(url)
        self.reads: Counter[int] = Counter()
        self.calls = 0

        async def fetch(ids):
            ids = list(ids)
            self.calls += 1
            self.reads.update(ids)
            return await report_jobs.read_jobs(self.db, ids)

        self.hub = CompletionHub(lambda: url, fetch, **kwargs)

    async def __aenter__(self) -> CompletionHub:
        await self.db.open()
        await self.hub.start()
        await asyncio.wait_for(self.hub.connected.wait(), 30)
        return self.hub

    async def __aexit__(self, *exc) -> None:
        await self.hub.stop()
        await self.db.close()


def _listeners(conn: psycopg.Connection, name: str) -> list[tuple]:
    return conn.execute("SELECT pid, query FROM pg_stat_activity WHERE application_name = %s",
                        [name]).fetchall()


def test_one_read_answers_every_waiter_of_a_job(db_url):
    async def main():
        holder = Hub(db_url)
        async with holder as hub:
            with psycopg.connect(db_url, autocommit=True) as conn:
                assert len(_listeners(conn, hub.application_name)) == 1
                job = queue.enqueue("report.payments", conn=conn)
                other = queue.enqueue("report.payments", {"other": 1}, conn=conn)
                waiters = [hub.register(job.id) for _ in range(500)]
                bystander = hub.register(other.id)
                claimed = queue.claim(conn, queue="default", limit=1, worker_id=WORKER, lease=30)
                assert [c.id for c in claimed] == [job.id]
                queue.complete(conn, WORKER, [(job.id, 1, {"data": [{"user_id": 1, "total_payment": 3}]})])
            views = await asyncio.wait_for(asyncio.gather(*waiters), 30)
            assert {id(v) for v in views} == {id(views[0])}          # one read, shared
            assert views[0].state == "succeeded"
            assert views[0].data()["result"] == {"data": [{"user_id": 1, "total_payment": 3}]}
            assert holder.reads[job.id] == 1
            assert not bystander.done() and hub.waiting == 1
            hub.discard(other.id, bystander)
            assert hub.waiting == 0

    asyncio.run(main())


def test_a_notification_lost_while_reconnecting_is_recovered(db_url, pg_server):
    dbname = conninfo_to_dict(db_url)["dbname"]

    def allow_connections(allow: bool) -> None:
        with pg_server.admin() as admin:
            admin.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS {}").format(
                sql.Identifier(dbname), sql.Literal(allow)))

    async def main():
        holder = Hub(db_url, backoff=(0.05, 0.2))
        async with holder as hub:
            with psycopg.connect(db_url, autocommit=True) as conn:
                job = queue.enqueue("report.payments", conn=conn)
                waiter = hub.register(job.id)
                allow_connections(False)
                try:
                    conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                 "WHERE application_name = %s", [hub.application_name])
                    for _ in range(300):
                        if not hub.connected.is_set():
                            break
                        await asyncio.sleep(0.05)
                    assert not hub.connected.is_set(), "the listener did not notice"
                    # Finished while nobody listens: this notification is lost.
                    _finish(conn, job.id, {"data": []})
                    await asyncio.sleep(0.5)
                    assert not waiter.done() and hub.connects == 1
                finally:
                    allow_connections(True)
                view = await asyncio.wait_for(waiter, 30)
                assert view.state == "succeeded" and hub.connects == 2
                assert len(_listeners(conn, hub.application_name)) == 1

    asyncio.run(main())


def test_stopping_answers_waiters_with_the_current_state(db_url):
    async def main():
        holder = Hub(db_url)
        async with holder as hub:
            with psycopg.connect(db_url, autocommit=True) as conn:
                job = queue.enqueue("report.payments", conn=conn)
            waiters = [hub.register(job.id) for _ in range(3)]
            shutting_down = asyncio.Event()
            watcher = asyncio.create_task(hub._watch_shutdown(shutting_down))
            shutting_down.set()
            views = await asyncio.wait_for(asyncio.gather(*waiters), 30)
            await watcher
            assert {v.state for v in views} == {"queued"}
            assert hub.closed and hub.register(job.id).done()      # no new waits

    asyncio.run(main())


def test_concurrent_reads_are_coalesced(db_url):
    async def main():
        holder = Hub(db_url)
        async with holder as hub:
            with psycopg.connect(db_url, autocommit=True) as conn:
                ids = queue.enqueue_many("report.payments", [{} for _ in range(20)], conn=conn)
                noop = queue.enqueue("jobrunner.noop", conn=conn).id
            calls_before = holder.calls
            asked = [ids[i % 20] for i in range(1000)] + [noop, 10**12]
            views = await asyncio.wait_for(asyncio.gather(*(hub.read(i) for i in asked)), 30)
            assert [v.id for v in views[:1000]] == asked[:1000]
            assert {v.state for v in views[:1000]} == {"queued"}
            assert views[1000:] == [None, None]          # not a report job; no such job
            assert holder.calls - calls_before <= 3      # a few queries, not a thousand
            assert max(holder.reads[i] for i in ids) <= 3

    asyncio.run(main())


def test_a_job_finished_without_notification_is_found_by_the_periodic_recheck(db_url):
    async def main():
        holder = Hub(db_url, ping_every=0.1, recheck_every=0.3)
        async with holder as hub:
            with psycopg.connect(db_url, autocommit=True) as conn:
                job = queue.enqueue("report.payments", conn=conn)
                waiter = hub.register(job.id)
                # Final, but no NOTIFY (as behind a proxy that drops them).
                conn.execute("UPDATE jobs SET state = 'cancelled', finished_at = now() WHERE id = %s",
                             [job.id])
            view = await asyncio.wait_for(waiter, 30)
            assert view.state == "cancelled" and hub.connects == 1

    asyncio.run(main())


def test_a_slow_read_does_not_hold_back_the_next_notified_job(db_url):
    """Under load a batched read waits for the server; jobs notified meanwhile are read
    by another read in flight, not queued behind it. A failed read is retried."""
    async def main():
        holder = Hub(db_url, backoff=(0.05, 0.1))
        release_first = asyncio.Event()
        real_fetch = holder.hub._fetch
        blocked: list[int] = []
        failing: set[int] = set()

        async def fetch(ids):
            ids = list(ids)
            if jobs[0] in ids and not release_first.is_set():
                blocked.append(jobs[0])
                await release_first.wait()
            if failing & set(ids):
                failing.clear()
                raise psycopg.OperationalError("connection lost (injected)")
            return await real_fetch(ids)

        holder.hub._fetch = fetch
        jobs: list[int] = []
        async with holder as hub:
            try:
                with psycopg.connect(db_url, autocommit=True) as conn:
                    def finish_new(n: int) -> tuple[int, asyncio.Future]:
                        job_id = queue.enqueue("report.payments", {"n": n}, conn=conn).id
                        jobs.append(job_id)
                        waiter = hub.register(job_id)
                        return job_id, waiter

                    first, waiting_first = finish_new(1)
                    _finish(conn, first)
                    for _ in range(300):                 # until its read is stuck
                        if blocked:
                            break
                        await asyncio.sleep(0.01)
                    assert blocked == [first]
                    second, waiting_second = finish_new(2)
                    _finish(conn, second)
                    view = await asyncio.wait_for(waiting_second, 30)
                    assert view.state == "succeeded" and not waiting_first.done()
                    third, waiting_third = finish_new(3)
                    failing.add(third)                   # its first read fails
                    _finish(conn, third)
                    assert (await asyncio.wait_for(waiting_third, 30)).state == "succeeded"
                    assert not failing and holder.reads[third] == 1   # the retry's read
                    assert not waiting_first.done()
            finally:
                release_first.set()
            assert (await asyncio.wait_for(waiting_first, 30)).state == "succeeded"

    asyncio.run(main())
