"""Report API v2 in-process (falcon.testing.ASGIConductor, lifespan included) on a real
database; the worker's side is played with the queue's own functions, so every state a
report job can be in is shown: running, failed (retry scheduled), dead, cancelled."""
from __future__ import annotations

import asyncio
import json

import psycopg
from falcon import testing

from api.app import create_app
from jobrunner import queue

SUBMIT = "/api/2.0/report/payments"
WORKER = "test-worker"


def path(job_id: int, query: str = "") -> str:
    return f"{SUBMIT}/{job_id}" + (f"?{query}" if query else "")


def claim_one(conn) -> queue.Claimed:
    (claimed,) = queue.claim(conn, queue="default", limit=1, worker_id=WORKER, lease=30)
    return claimed


async def long_poll(api, job_id: int, wait: str) -> tuple[int, dict]:
    """GET ?wait=... as a client that stays connected until it has the answer
    (simulate_get disconnects the simulated client at once, ending any long-poll)."""
    async with api.simulate_get_stream(path(job_id), params={"wait": wait}) as streamed:
        body = b""
        for _ in range(10_000):
            body += await streamed.stream.read()
            try:
                return streamed.status_code, json.loads(body)
            except ValueError:
                await asyncio.sleep(0.001)
    raise AssertionError(f"incomplete body {body[:200]!r}")


async def disconnected_poll(api, job_id: int, wait: str):
    """GET ?wait=... whose client goes away at once."""
    return await api.simulate_get(path(job_id), params={"wait": wait})


def run(db_url, scenario) -> None:
    async def main():
        async with testing.ASGIConductor(create_app(db_url)) as conductor:
            with psycopg.connect(db_url, autocommit=True) as conn:
                await scenario(conductor, conn)
    asyncio.run(main())


def test_running_failed_and_dead_jobs(db_url):
    async def scenario(api, conn):
        job_id = (await api.simulate_post(SUBMIT)).json["data"]["job_id"]
        claimed = claim_one(conn)
        assert claimed.id == job_id and claimed.kind == "report.payments"

        running = await api.simulate_get(path(job_id))
        assert running.status_code == 202 and running.headers["retry-after"] == "1"
        data = running.json["data"]
        assert data["status"] == "running" and data["attempts"] == 1 and data["started_at"]
        assert data["last_error"] is None and "result" not in data
        # Submitting again joins the running job.
        assert (await api.simulate_post(SUBMIT)).json["data"] == {
            "job_id": job_id, "status": "running", "status_url": path(job_id)}

        queue.fail(conn, WORKER, [queue.Failure(job_id, 1, "ReportDataError", "orders vanished",
                                                retry_in=0.0)])
        status, failed = await long_poll(api, job_id, "0.3")
        assert status == 202                                # a retry is scheduled: not final
        assert failed["data"]["status"] == "failed"
        assert failed["data"]["last_error"] == "orders vanished"

        claimed = claim_one(conn)
        assert claimed.attempts == 2
        queue.fail(conn, WORKER, [queue.Failure(job_id, 2, "PermanentFailure", "bad args",
                                                permanent=True)])
        status, dead = await long_poll(api, job_id, "30")
        assert status == 200
        data = dead["data"]
        assert data["status"] == "dead" and data["last_error"] == "bad args"
        assert data["attempts"] == 2 and data["finished_at"] and "result" not in data
        # Cancelling a finished job changes nothing.
        again = await api.simulate_delete(path(job_id))
        assert again.status_code == 200 and again.json["data"]["status"] == "dead"

    run(db_url, scenario)


def test_cancelling_a_running_job_is_cooperative_and_ends_its_long_polls(db_url):
    async def scenario(api, conn):
        job_id = (await api.simulate_post(SUBMIT)).json["data"]["job_id"]
        claimed = claim_one(conn)
        polls = [asyncio.create_task(long_poll(api, job_id, "30")) for _ in range(5)]
        await asyncio.sleep(0.5)
        assert not any(p.done() for p in polls)

        cancel = await api.simulate_delete(path(job_id))
        assert cancel.status_code == 200
        assert cancel.json["data"]["status"] == "running"
        assert cancel.json["data"]["cancel_requested"] is True
        await asyncio.sleep(0.3)
        assert not any(p.done() for p in polls)       # still running: nobody answered

        # The task noticed and stopped: its worker marks it cancelled.
        assert queue.mark_cancelled(conn, WORKER, [(job_id, claimed.attempts)]) == {job_id}
        answers = await asyncio.wait_for(asyncio.gather(*polls), 30)
        for status, answer in answers:
            assert status == 200
            assert answer["data"]["status"] == "cancelled"
            assert answer["data"]["finished_at"]

    run(db_url, scenario)


def test_a_succeeded_job_shows_its_stored_result(db_url):
    async def scenario(api, conn):
        job_id = (await api.simulate_post(SUBMIT, headers={"Idempotency-Key": "k1"})).json["data"]["job_id"]
        poll = asyncio.create_task(long_poll(api, job_id, "30"))
        gone = await disconnected_poll(api, job_id, "30")          # the client left at once
        assert gone.status_code == 202 and gone.json["data"]["status"] == "queued"
        await asyncio.sleep(0.3)
        assert not poll.done()
        claimed = claim_one(conn)
        result = {"data": [{"user_id": 1, "total_payment": 15},
                           {"user_id": 2147483647, "total_payment": 4294967294}]}
        assert queue.complete(conn, WORKER, [(job_id, claimed.attempts, result)]) == {job_id}
        status, answer = await asyncio.wait_for(poll, 30)
        assert status == 200
        assert answer["data"]["status"] == "succeeded"
        assert answer["data"]["result"] == result
        plain = await api.simulate_get(path(job_id))
        assert plain.json == answer
        replay = await api.simulate_post(SUBMIT, headers={"Idempotency-Key": "k1"})
        assert replay.status_code == 202 and replay.json["data"]["job_id"] == job_id
        assert replay.json["data"]["status"] == "succeeded"

    run(db_url, scenario)


def test_concurrent_submits_share_one_statement_and_later_submits_see_the_new_state(db_url):
    from api import report_jobs
    from api.db import Database

    async def main():
        db = Database(db_url)
        await db.open()
        try:
            before = db.pool.get_stats().get("requests_num", 0)
            jobs = await asyncio.gather(*(report_jobs.submit(db) for _ in range(30)))
            assert {(j.id, j.state) for j in jobs} == {(jobs[0].id, "queued")}
            assert db.pool.get_stats()["requests_num"] - before == 1   # one checkout
            # Once the job is final, the next submit makes a new job (a batch's answer
            # is never handed to a request that arrived after its statement started).
            with psycopg.connect(db_url, autocommit=True) as conn:
                queue.cancel(jobs[0].id, conn=conn)
            again = await report_jobs.submit(db)
            assert again.id != jobs[0].id and again.state == "queued"
            keyed = await asyncio.gather(*(report_jobs.submit(db, "k-1") for _ in range(5)))
            assert {(j.id, j.state) for j in keyed} == {(again.id, "queued")}
        finally:
            await db.close()

    asyncio.run(main())
