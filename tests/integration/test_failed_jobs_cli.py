"""`jobrunner failed|retry|cancel|discard|stats` as operators run them (subprocesses)."""
from __future__ import annotations

import json
import subprocess
import sys

from jobrunner import config, queue
from tests.integration.test_failed_jobs import claim, fail


def cli(db_url, *args):
    return subprocess.run([sys.executable, "-m", "jobrunner", *args],
                          env={"DATABASE_URL": db_url, "PATH": "/usr/bin:/bin", "LOG_LEVEL": "warning"},
                          cwd=config.ROOT, capture_output=True, text=True, timeout=60)


def test_cli_failed_retry_cancel_stats(db_url, conn):
    empty = cli(db_url, "failed")
    assert (empty.returncode, empty.stdout.strip()) == (0, "no failed jobs")
    job = queue.enqueue("jobrunner.fail", {"message": "x"}, queue="mail", max_attempts=1, conn=conn)
    claim(conn, queue_name="mail")
    fail(conn, job.id, 1)
    other = queue.enqueue("jobrunner.sleep", {"seconds": 5}, conn=conn)

    table = cli(db_url, "failed")
    assert table.returncode == 0, table.stderr
    header, rule, line, count = table.stdout.splitlines()
    assert header.split()[:5] == ["ID", "QUEUE", "KIND", "STATE", "ATTEMPTS"]
    assert line.split()[:6] == [str(job.id), "mail", "jobrunner.fail", "dead", "1/1", "1"]
    assert "boom 1" in line and count == "(1 job)"
    [row] = json.loads(cli(db_url, "failed", "--json").stdout)
    assert (row["id"], row["state"], row["errors_count"], row["last_error"]) == (job.id, "dead", 1, "boom 1")

    stats = cli(db_url, "stats")
    assert stats.returncode == 0
    assert [line.split()[:3] for line in stats.stdout.splitlines()[2:]] == [
        ["default", "queued", "1"], ["mail", "dead", "1"]]
    assert {(r["queue"], r["state"], r["count"]) for r in json.loads(cli(db_url, "stats", "--json").stdout)} == {
        ("default", "queued", 1), ("mail", "dead", 1)}

    # bad input: status 2, one line
    for args in (["retry"], ["retry", "abc"], ["retry", "0"], ["retry", "1", "--dead"],
                 ["retry", "1", "--queue", "mail"], ["cancel", "x"], ["failed", "--limit", "0"],
                 ["retry", "--bogus"]):
        out = cli(db_url, *args)
        assert out.returncode == 2, (args, out.stdout, out.stderr)
        assert out.stderr.strip().splitlines()[-1].startswith(("jobrunner: error:", "usage:")), out.stderr
    # unknown id: status 1
    for args in (["retry", "99999"], ["cancel", "99999"], ["discard", "99999"]):
        out = cli(db_url, *args)
        assert (out.returncode, out.stderr.strip()) == (1, "jobrunner: error: no job with id 99999"), args
    # a state that does not allow it: status 1 with the reason
    out = cli(db_url, "retry", str(other.id))
    assert out.returncode == 1 and "is queued: only failed or dead jobs can be retried" in out.stderr

    out = cli(db_url, "retry", "--dead", "--queue", "default")
    assert (out.returncode, out.stdout.strip()) == (0, "retried 0 dead jobs")
    out = cli(db_url, "retry", "--dead", "--kind", "jobrunner.fail")
    assert (out.returncode, out.stdout.strip()) == (0, f"retried 1 dead job: {job.id}")
    assert queue.get(job.id, conn=conn).state == "queued"

    out = cli(db_url, "cancel", str(job.id))
    assert (out.returncode, out.stdout.strip()) == (0, f"job {job.id} cancelled")
    out = cli(db_url, "discard", str(job.id))
    assert (out.returncode, out.stdout.strip()) == (0, f"job {job.id} (cancelled) discarded")
    assert conn.execute("SELECT count(*) FROM jobs WHERE id = %s", (job.id,)).fetchone()[0] == 0
