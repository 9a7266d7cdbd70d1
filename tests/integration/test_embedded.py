"""The embedded server: start, re-attach, stop (its own temp dir, whatever DATABASE_URL is)."""
import shutil
import tempfile
from pathlib import Path

import psycopg
import pytest

from jobrunner import embedded


def test_start_reattach_stop():
    data_dir = Path(tempfile.mkdtemp(prefix="jobrunner-embedded-"))
    try:
        url = embedded.start(data_dir)
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
            pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
            assert pid > 0
        # A second start re-attaches to the running server: same URL, same postmaster.
        assert embedded.start(data_dir) == url
        postmaster = (data_dir / "postmaster.pid").read_text().split()[0]
        assert embedded.start(data_dir) == url
        assert (data_dir / "postmaster.pid").read_text().split()[0] == postmaster
        assert embedded.stop(data_dir) is True
        assert not (data_dir / "postmaster.pid").exists()
        assert embedded.stop(data_dir) is False
    finally:
        embedded.stop(data_dir)
        shutil.rmtree(data_dir, ignore_errors=True)


def test_suite_server_is_tuned_for_tests(pg_server):
    if pg_server.kind != "embedded":
        pytest.skip("DATABASE_URL points at an external server")
    with pg_server.admin() as conn:
        assert conn.execute("SHOW fsync").fetchone()[0] == "off"
        assert conn.execute("SHOW synchronous_commit").fetchone()[0] == "off"
