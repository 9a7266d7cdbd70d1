"""The suite also runs against a server given by DATABASE_URL (not only the embedded one):
a small part of it runs in a child pytest pointed at this session's server, and must pass
and drop every database it made."""
from __future__ import annotations

import os
import subprocess
import sys

from jobrunner.config import ROOT

# Migrations (template and per-test databases made there) and the seed script's runs
# (a child process given the URL); its many bad-argument cases are left out for time.
SUBSET = ["tests/integration/test_migrate.py", "tests/integration/test_seed.py",
          "-k", "not bad_arguments"]


def _test_databases(pg_server) -> set[str]:
    with pg_server.admin() as conn:
        return {row[0] for row in conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE 'jr\\_%'")}


def test_subset_passes_with_database_url_and_drops_its_databases(pg_server, tmp_path):
    before = _test_databases(pg_server)
    env = dict(os.environ, DATABASE_URL=pg_server.admin_url)
    env.pop("DB_RESTART_CMD", None)
    child = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "--basetemp", str(tmp_path / "child"), *SUBSET],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output, _ = child.communicate(timeout=120)
    assert child.returncode == 0, output
    assert " passed" in output and "skipped" not in output, output

    after = _test_databases(pg_server)
    # The child's template is named after its pid; it must be gone.
    assert not {name for name in after if name.startswith(f"jr_template_{child.pid}_")}, after
    if pg_server.kind == "embedded":
        # This session's server is ours alone: nothing new may be left at all.
        assert after - before == set(), after - before
