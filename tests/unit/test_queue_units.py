"""Queue pieces that need no database: task registry, backoff, CLI parsing, config."""
from __future__ import annotations

import random
import threading

import pytest

from jobrunner import cli, errors, tasks
from jobrunner.sqlfile import queries
from jobrunner.worker import WorkerConfig


def test_builtin_tasks_are_registered():
    names = set(tasks.registry())
    assert {"jobrunner.noop", "jobrunner.sleep", "jobrunner.fail", "report.payments"} <= names
    assert tasks.get_task("jobrunner.noop").inline
    assert tasks.get_task("report.payments").timeout


def test_unknown_task_is_a_permanent_failure():
    with pytest.raises(errors.PermanentFailure, match="unknown task 'nope'"):
        tasks.get_task("nope")


def test_bind_rejects_args_that_do_not_fit():
    sleep = tasks.get_task("jobrunner.sleep")
    sleep.bind({"seconds": 1})
    sleep.bind(None)
    sleep.bind([2])
    for bad in ({"secs": 1}, [1, 2], "x"):
        with pytest.raises(errors.PermanentFailure, match="rejected its args"):
            sleep.bind(bad)


def test_sleep_rejects_bad_values():
    with pytest.raises(errors.PermanentFailure):
        tasks.sleep(seconds=-1)
    with pytest.raises(errors.PermanentFailure):
        tasks.sleep(seconds="1")


def test_fail_raises_its_message():
    with pytest.raises(RuntimeError, match="boom"):
        tasks.fail("boom")


@pytest.mark.parametrize("attempt,raw", [(1, 2.0), (2, 4.0), (3, 8.0), (4, 10.0), (10, 10.0)])
def test_retry_delay_is_exponential_capped_and_jittered(attempt, raw):
    t = tasks.Task("x", lambda: None, backoff=(2.0, 10.0))
    rng = random.Random(1)
    delays = [t.retry_delay(attempt, rng) for _ in range(200)]
    assert all(raw * 0.8 <= d <= raw * 1.2 for d in delays)
    assert len({round(d, 6) for d in delays}) > 100   # jittered, not lockstep


def test_task_decorator_validates_options():
    with pytest.raises(ValueError):
        tasks.task("bad", max_attempts=0)
    with pytest.raises(ValueError):
        tasks.task("bad", timeout=0)
    with pytest.raises(ValueError):
        tasks.task("bad", backoff=(5, 1))


def test_current_job_outside_a_task_raises():
    with pytest.raises(RuntimeError):
        tasks.current_job()


def test_job_context_sleep_stops_on_cancel():
    ctx = tasks.JobContext(1, "k", "default", {}, 1, 5, "w")
    threading.Timer(0.05, ctx._cancel.set).start()
    with pytest.raises(errors.JobCancelled):
        ctx.sleep(30)
    assert ctx.cancel_requested()


def test_every_queue_query_parses():
    q = queries("queue")
    for name in ("enqueue", "enqueue_many", "claim", "complete", "fail", "cancelled", "release",
                 "heartbeat", "reap_expired", "cancel", "get", "prune"):
        assert q[name].strip()
    assert "SKIP LOCKED" in q["claim"]


def test_cli_has_subcommands_and_rejects_bad_input(capsys):
    parser = cli.build_parser()
    args = parser.parse_args(["worker", "--queues", "a,b", "--concurrency", "3", "--lease", "2"])
    assert args.func is cli.cmd_worker and args.concurrency == 3 and args.lease == 2.0
    assert parser.parse_args(["prune", "--older-than", "7d"]).older_than == 7 * 86400
    for bad in (["worker", "--concurrency", "0"], ["prune", "--older-than", "soon"], ["nope"]):
        with pytest.raises(SystemExit) as exc:
            parser.parse_args(bad)
        assert exc.value.code == 2


def test_worker_config_from_env(monkeypatch):
    monkeypatch.setenv("JOBRUNNER_QUEUES", "a, b")
    monkeypatch.setenv("JOBRUNNER_CONCURRENCY", "3")
    monkeypatch.setenv("JOBRUNNER_LEASE", "12")
    monkeypatch.setenv("JOBRUNNER_LISTEN", "0")
    monkeypatch.setenv("JOBRUNNER_PRUNE_OLDER_THAN", "2d")
    cfg = WorkerConfig.from_env(concurrency=5)
    assert cfg.queues == ("a", "b") and cfg.concurrency == 5 and cfg.lease == 12.0
    assert cfg.listen is False and cfg.prune_older_than == 2 * 86400
    with pytest.raises(ValueError):
        WorkerConfig(concurrency=0).validate()
