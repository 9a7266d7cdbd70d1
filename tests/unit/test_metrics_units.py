"""jobrunner.metrics without a database: the queue-level families built from query rows,
the outcome counting of a completer batch, and a scrape when the database is away."""
from __future__ import annotations

from types import SimpleNamespace

from prometheus_client.parser import text_string_to_metric_families

from jobrunner import metrics, queue


def samples(families) -> dict[tuple, float]:
    return {(s.name, *sorted(s.labels.items())): s.value for f in families for s in f.samples}


def test_queue_families_from_rows():
    rows = [
        ("default", "jobrunner.noop", "succeeded", 10, None),
        ("default", "jobrunner.fail", "dead", 2, None),
        ("default", "jobrunner.noop", "queued", 3, 12.5),
        ("default", "jobrunner.fail", "failed", 1, 40.0),   # due retry: counts towards the age
        ("mail", "emails.send", "queued", 1, None),         # scheduled for later: no age
    ]
    got = samples(metrics.queue_families(rows))
    assert got[("jobrunner_queue_stats_up",)] == 1
    assert got[("jobrunner_jobs", ("queue", "default"), ("state", "succeeded"))] == 10
    assert got[("jobrunner_jobs", ("queue", "default"), ("state", "queued"))] == 3
    assert got[("jobrunner_jobs", ("queue", "default"), ("state", "running"))] == 0
    assert got[("jobrunner_jobs", ("queue", "mail"), ("state", "queued"))] == 1
    # every state of every queue is present
    assert sum(1 for k in got if k[0] == "jobrunner_jobs") == 2 * len(queue.STATES)
    assert got[("jobrunner_queue_oldest_job_age_seconds", ("queue", "default"))] == 40.0
    assert got[("jobrunner_queue_oldest_job_age_seconds", ("queue", "mail"))] == 0
    assert got[("jobrunner_dead_jobs", ("kind", "jobrunner.fail"), ("queue", "default"))] == 2
    assert got[("jobrunner_dead_jobs", ("kind", "jobrunner.noop"), ("queue", "default"))] == 0
    assert got[("jobrunner_dead_jobs", ("kind", "emails.send"), ("queue", "mail"))] == 0


def test_queue_families_without_a_database():
    assert samples(metrics.queue_families(None)) == {("jobrunner_queue_stats_up",): 0}
    body, content_type = metrics.exposition(None)
    assert content_type.startswith("text/plain")
    names = {f.name for f in text_string_to_metric_families(body.decode())}
    assert "jobrunner_queue_stats_up" in names and "jobrunner_jobs" not in names


def _count(counter, *labels) -> float:
    return counter.labels(*labels)._value.get()


def test_outcomes_count_only_what_was_written():
    def job(job_id, kind="unit.kind"):
        return SimpleNamespace(id=job_id, queue="unit-q", kind=kind)

    def failure(job_id, error_type):
        return queue.Failure(job_id, 1, error_type, "boom")

    before = {
        "succeeded": _count(metrics.JOBS_FINISHED, "unit-q", "unit.kind", "succeeded"),
        "dead": _count(metrics.JOBS_FINISHED, "unit-q", "unit.kind", "dead"),
        "cancelled": _count(metrics.JOBS_FINISHED, "unit-q", "unit.kind", "cancelled"),
        "boom": _count(metrics.FAILED_ATTEMPTS, "unit-q", "unit.kind", "BoomError"),
    }
    batch = [
        ("succeeded", job(1), {"ok": True}),
        ("succeeded", job(2), None),                 # lease lost: not written
        ("failed", job(3), failure(3, "BoomError")),  # retried later
        ("failed", job(4), failure(4, "BoomError")),  # its last attempt: dead
        ("failed", job(5), failure(5, "BoomError")),  # not written
        ("cancelled", job(6), None),
        ("released", job(7), None),                  # shutdown: not an outcome
    ]
    written = queue.Finished(succeeded={1}, failed={3: "failed", 4: "dead"}, cancelled={6},
                             released={7: "queued"})
    metrics.observe_outcomes(batch, written)
    assert _count(metrics.JOBS_FINISHED, "unit-q", "unit.kind", "succeeded") - before["succeeded"] == 1
    assert _count(metrics.JOBS_FINISHED, "unit-q", "unit.kind", "dead") - before["dead"] == 1
    assert _count(metrics.JOBS_FINISHED, "unit-q", "unit.kind", "cancelled") - before["cancelled"] == 1
    assert _count(metrics.FAILED_ATTEMPTS, "unit-q", "unit.kind", "BoomError") - before["boom"] == 2


def test_claim_observations():
    histogram = metrics.CLAIM_BATCH.labels("unit-claims")
    latency = metrics.PICKUP_LATENCY.labels("unit-claims")

    def total(h) -> float:
        return sum(b.get() for b in h._buckets)

    metrics.observe_claim("unit-claims", [])        # an empty poll is not a batch
    assert total(histogram) == 0
    claimed = [SimpleNamespace(waited=0.01), SimpleNamespace(waited=-1.0), SimpleNamespace(waited=None)]
    metrics.observe_claim("unit-claims", claimed)
    assert total(histogram) == 1 and histogram._sum.get() == 3
    assert total(latency) == 2                       # the one without a figure is skipped
    assert latency._sum.get() == 0.01                # a negative wait (clock skew) counts as 0
