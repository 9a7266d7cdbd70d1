"""libpq URL / conninfo -> asyncpg.connect() keyword arguments."""
from __future__ import annotations

import pytest

from jobrunner.db import asyncpg_connect_kwargs


@pytest.mark.parametrize("conninfo, kwargs", [
    ("postgresql://postgres:@/postgres?host=/tmp/pg-data-dir",
     {"user": "postgres", "database": "postgres", "host": "/tmp/pg-data-dir"}),
    ("host=/var/run/postgresql dbname=shop user=app",
     {"host": "/var/run/postgresql", "database": "shop", "user": "app"}),
    ("postgresql://app:s%40cret@db.example:6543/shop?sslmode=require&connect_timeout=4",
     {"user": "app", "password": "s@cret", "host": "db.example", "port": 6543, "database": "shop",
      "ssl": "require", "timeout": 4.0}),
    ("postgresql://root@127.0.0.1:5432/postgres",
     {"user": "root", "host": "127.0.0.1", "port": 5432, "database": "postgres"}),
    ("host=a,b port=5432,5433 dbname=x", {"host": ["a", "b"], "port": [5432, 5433], "database": "x"}),
    ("host=db.example hostaddr=10.0.0.5 dbname=x", {"host": "10.0.0.5", "database": "x"}),
    ("dbname=x application_name=report options='-c search_path=s1 -cstatement_timeout=5s --work-mem=64MB'",
     {"database": "x", "server_settings": {"application_name": "report", "search_path": "s1",
                                           "statement_timeout": "5s", "work_mem": "64MB"}}),
    ("dbname=x keepalives=1 target_session_attrs=any", {"database": "x"}),
])
def test_conversion(conninfo, kwargs):
    assert asyncpg_connect_kwargs(conninfo) == kwargs


def test_empty_password_is_no_password():
    assert "password" not in asyncpg_connect_kwargs("postgresql://u:@h/d")


@pytest.mark.parametrize("conninfo", ["dbname=x sslcert=/c.pem", "dbname=x options=-x"])
def test_unsupported_parameters_are_refused(conninfo):
    with pytest.raises(ValueError):
        asyncpg_connect_kwargs(conninfo)


def test_invalid_conninfo_raises():
    with pytest.raises(Exception):
        asyncpg_connect_kwargs("host=a dbname")
