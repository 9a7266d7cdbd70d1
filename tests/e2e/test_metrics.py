"""Prometheus metrics end to end: a real API (gunicorn, two worker processes) and a real
`jobrunner worker --metrics-port` running jobs; the scraped figures equal the database's,
and the scraped metric names are exactly the ones docs/operations.md documents."""
from __future__ import annotations

import re
import signal
from concurrent.futures import ThreadPoolExecutor

import httpx
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from jobrunner import config, queue
from tests.e2e.conftest import free_port
from tests.workers import start_worker, wait_until  # noqa: F401 - start_worker is a fixture

pytestmark = pytest.mark.e2e

TYPE = ("__type__",)
DOCUMENTED = re.compile(r"^\| `((?:jobrunner|api)_[a-z_]+)` \|", re.MULTILINE)


def scrape(url: str) -> dict[str, dict[tuple, float]]:
    """{family name: {sorted label items + sample name: value}} of one scrape."""
    resp = httpx.get(url, timeout=30.0)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/plain")
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(resp.text):
        samples = out.setdefault(family.name, {TYPE: family.type})
        for sample in family.samples:
            samples[(sample.name, *sorted(sample.labels.items()))] = sample.value
    return out


def value(figures, family: str, sample: str | None = None, **labels) -> float | None:
    key = (sample or family, *sorted(labels.items()))
    return figures.get(family, {}).get(key)


def documented_metrics() -> set[str]:
    text = (config.ROOT / "docs" / "operations.md").read_text()
    section = text.split("## Metrics", 1)[1].split("\n## ", 1)[0]
    return set(DOCUMENTED.findall(section))


def ours(figures) -> set[str]:
    """Families of this project (not process_*/python_*), by their documented name."""
    names = set()
    for name, samples in figures.items():
        if not name.startswith(("jobrunner_", "api_")):
            continue
        # The parser names counters without `_total`; the document names the series.
        names.add(name + "_total" if samples[TYPE] == "counter" else name)
    return names


def test_metrics_match_the_database(new_database, gunicorn, start_worker):
    url = new_database()
    server = gunicorn(url, env={"WEB_CONCURRENCY": "2"})
    port = free_port()
    worker = start_worker("--concurrency", "4", "--poll-interval", "0.2",
                          "--metrics-port", str(port), url=url)
    worker.wait_listening()
    worker_metrics = f"http://127.0.0.1:{port}/metrics"

    with psycopg.connect(url, autocommit=True) as conn:
        queue.enqueue_many("jobrunner.noop", [{}] * 25, conn=conn)
        queue.enqueue("jobrunner.fail", {"message": "boom"}, max_attempts=2, conn=conn)
        # Due but never claimed (no worker serves "idle"), and one scheduled for later.
        queue.enqueue("jobrunner.noop", queue="idle", conn=conn)
        queue.enqueue("jobrunner.noop", queue="idle", delay=3600, conn=conn)
        wait_until(lambda: conn.execute(
            "SELECT count(*) FILTER (WHERE state IN ('succeeded', 'dead')) = 26 FROM jobs"
        ).fetchone()[0], 60, what="the jobs to finish")

        # The worker's own figures equal what it wrote.
        figures = scrape(worker_metrics)
        finished = {(k, s): n for k, s, n in conn.execute(
            "SELECT kind, state, count(*) FROM jobs WHERE queue = 'default' GROUP BY 1, 2")}
        assert finished == {("jobrunner.noop", "succeeded"): 25, ("jobrunner.fail", "dead"): 1}
        assert value(figures, "jobrunner_jobs_finished", "jobrunner_jobs_finished_total",
                     queue="default", kind="jobrunner.noop", outcome="succeeded") == 25
        assert value(figures, "jobrunner_jobs_finished", "jobrunner_jobs_finished_total",
                     queue="default", kind="jobrunner.fail", outcome="dead") == 1
        errors_recorded, attempts = conn.execute(
            "SELECT sum(jsonb_array_length(errors)), sum(attempts) FROM jobs").fetchone()
        assert errors_recorded == 2
        assert value(figures, "jobrunner_job_failed_attempts",
                     "jobrunner_job_failed_attempts_total", queue="default",
                     kind="jobrunner.fail", error_type="RuntimeError") == 2
        # Every attempt was claimed once, waited once and ran once.
        assert value(figures, "jobrunner_job_pickup_latency_seconds",
                     "jobrunner_job_pickup_latency_seconds_count", queue="default") == attempts
        assert value(figures, "jobrunner_claim_batch_size", "jobrunner_claim_batch_size_sum",
                     queue="default") == attempts
        runs = sum(v for k, v in figures["jobrunner_job_run_seconds"].items()
                   if k[0] == "jobrunner_job_run_seconds_count")
        assert runs == attempts
        assert "process_cpu_seconds_total" in str(figures.get("process_cpu_seconds"))

        # The listener's connection dies: the worker reconnects and counts it.
        assert value(figures, "jobrunner_listener_reconnects",
                     "jobrunner_listener_reconnects_total", role="worker") in (None, 0)
        killed = conn.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() "
            "AND application_name = 'jobrunner-worker-listener'").fetchone()[0]
        assert killed == 1
        wait_until(lambda: value(scrape(worker_metrics), "jobrunner_listener_reconnects",
                                 "jobrunner_listener_reconnects_total", role="worker") == 1,
                   30, interval=0.2, what="the listener to reconnect")
        worker_figures = scrape(worker_metrics)

        # The API's queue-level figures equal the database's at the time of the scrape.
        with httpx.Client(base_url=server.base_url, timeout=30.0) as http:
            for _ in range(30):
                assert http.get("/healthz").status_code == 200
            assert http.get("/no/such/route").status_code == 404
        figures = scrape(server.url("/metrics"))
        assert value(figures, "jobrunner_queue_stats_up") == 1
        by_state = {(q, s): n for q, s, n in conn.execute(
            "SELECT queue, state, count(*) FROM jobs GROUP BY 1, 2")}
        for q in ("default", "idle"):
            for state in queue.STATES:
                assert value(figures, "jobrunner_jobs", queue=q, state=state) == \
                    by_state.get((q, state), 0), (q, state)
        assert value(figures, "jobrunner_dead_jobs", queue="default", kind="jobrunner.fail") == 1
        assert value(figures, "jobrunner_dead_jobs", queue="default", kind="jobrunner.noop") == 0
        age = value(figures, "jobrunner_queue_oldest_job_age_seconds", queue="idle")
        due_age = conn.execute(
            "SELECT extract(epoch FROM now() - run_at)::float8 FROM jobs "
            "WHERE queue = 'idle' AND run_at <= now()").fetchone()[0]
        assert 0 < age <= due_age   # the scheduled job (an hour ahead) does not count
        assert value(figures, "jobrunner_queue_oldest_job_age_seconds", queue="default") == 0

        # Requests of both gunicorn workers are added up: every scrape (whichever worker
        # answers it) sees all 30 /healthz calls and the unmatched 404.
        for _ in range(4):
            again = scrape(server.url("/metrics"))
            assert value(again, "api_requests", "api_requests_total", method="GET",
                         route="/healthz", status="200") >= 30
            assert value(again, "api_requests", "api_requests_total", method="GET",
                         route="unmatched", status="404") == 1
            assert value(again, "api_request_duration_seconds",
                         "api_request_duration_seconds_count", method="GET",
                         route="unmatched") == 1

        # A long-poll waiting on a job nobody runs is counted while it waits.
        assert worker.alive()
        worker.signal(signal.SIGTERM)
        assert worker.wait(60) == 0
        with httpx.Client(base_url=server.base_url, timeout=60.0) as http:
            job_id = http.post("/api/2.0/report/payments").json()["data"]["job_id"]
            with ThreadPoolExecutor(1) as pool:
                waiting = pool.submit(http.get, f"/api/2.0/report/payments/{job_id}",
                                      params={"wait": "50"})
                wait_until(lambda: value(scrape(server.url("/metrics")),
                                         "jobrunner_longpoll_waiters") == 1,
                           30, interval=0.2, what="the waiter to be counted")
                assert not waiting.done()
                assert http.delete(f"/api/2.0/report/payments/{job_id}").status_code == 200
                assert waiting.result(30).json()["data"]["status"] == "cancelled"
        figures = scrape(server.url("/metrics"))
        assert value(figures, "jobrunner_longpoll_waiters") == 0

        # Both API processes' listeners lose their connection: two reconnects, added up.
        listeners = conn.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() "
            "AND application_name LIKE 'jobrunner-api-listener:%%'").fetchone()[0]
        assert listeners == 2
        wait_until(lambda: value(scrape(server.url("/metrics")), "jobrunner_listener_reconnects",
                                 "jobrunner_listener_reconnects_total", role="api") == 2,
                   30, interval=0.2, what="the API listeners to reconnect")

    # What the processes expose is what the document lists, and the reverse.
    exposed = ours(figures) | ours(worker_figures)
    documented = documented_metrics()
    missing_in_docs = exposed - documented
    assert not missing_in_docs, f"exposed but not documented: {missing_in_docs}"
    never_seen = documented - exposed
    assert not never_seen, f"documented but not exposed: {never_seen}"
