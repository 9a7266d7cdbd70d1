import os
import subprocess
import sys

import psycopg
import pytest

from jobrunner.config import ROOT
from scripts import seed


def _table(url):
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT user_id, total, created_at FROM orders ORDER BY id").fetchall()


def _run(url, *args):
    return subprocess.run([sys.executable, "-m", "scripts.seed", *args], cwd=ROOT,
                          env=dict(os.environ, DATABASE_URL=url), capture_output=True, text=True)


@pytest.fixture
def use_db(db_url, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", db_url)
    return db_url


def test_make_seed_count_and_truncate(db_url):
    env = dict(os.environ, DATABASE_URL=db_url)
    for _ in range(2):
        out = subprocess.run(["make", "-s", "seed", "COUNT=3000", "TRUNCATE=1"], cwd=ROOT, env=env,
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
    rows = _table(db_url)
    assert len(rows) == 3000
    assert {r[0] for r in rows} <= {1, 2, 3, 4, 5}
    assert all(100 <= r[1] <= 1000 for r in rows)
    assert "inserted 3,000 orders; orders now in the table: 3,000" in out.stdout
    out = subprocess.run(["make", "-s", "seed", "TRUNCATE=1", "COUNT=0"], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert _table(db_url) == []


def test_default_count_is_between_1000_and_5000(use_db):
    assert seed.main([]) == 0
    assert 1000 <= len(_table(use_db)) <= 5000


def test_seed_appends_without_truncate(use_db):
    seed.main(["--count", "10"])
    seed.main(["--count", "15"])
    assert len(_table(use_db)) == 25


def test_same_seed_same_data(use_db, capsys):
    seed.main(["--count", "500", "--seed", "7", "--truncate"])
    first = _table(use_db)
    seed.main(["--count", "500", "--seed", "7", "--truncate"])
    second = _table(use_db)
    assert [r[:2] for r in first] == [r[:2] for r in second]
    seed.main(["--count", "500", "--seed", "8", "--truncate"])
    assert [r[:2] for r in _table(use_db)] != [r[:2] for r in first]


def test_options_shape_the_data(use_db):
    seed.main(["--count", "2000", "--users", "3", "--min-total", "5", "--max-total", "7", "--truncate"])
    rows = _table(use_db)
    assert {r[0] for r in rows} == {1, 2, 3}
    assert {r[1] for r in rows} == {5, 6, 7}


def test_bulk_path_copies_binary_rows(use_db, monkeypatch):
    """Counts above FAKER_MAX go through numpy and binary COPY; same ranges, same determinism."""
    monkeypatch.setattr(seed, "FAKER_MAX", 100)
    monkeypatch.setattr(seed, "BLOCK", 700)  # several blocks, the last one partial
    seed.main(["--count", "2500", "--seed", "3", "--truncate", "--users", "4", "--quiet"])
    rows = _table(use_db)
    assert len(rows) == 2500
    assert {r[0] for r in rows} == {1, 2, 3, 4}
    assert all(100 <= r[1] <= 1000 for r in rows)
    seed.main(["--count", "2500", "--seed", "3", "--truncate", "--users", "4", "--quiet"])
    assert [r[:2] for r in _table(use_db)] == [r[:2] for r in rows]


@pytest.mark.parametrize("args", [
    ["--count", "-1"],
    ["--count", "abc"],
    ["--count", "100_000_001"],
    ["--count", "99999999999999999999"],
    ["--users", "0"],
    ["--min-total", "10", "--max-total", "5"],
    ["--min-total", "x"],
    ["--bogus"],
])
def test_bad_arguments_exit_2_and_write_nothing(db_url, args):
    _run(db_url, "--count", "5", "--seed", "1")
    before = _table(db_url)
    out = _run(db_url, *args, "--truncate")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("seed: error:"), out.stderr
    assert _table(db_url) == before
