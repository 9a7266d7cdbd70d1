"""Numbered migrations: sql/NNN_name.sql applied in order, each in its own transaction.

Applied versions are recorded in schema_migrations. A session-level advisory lock makes
concurrent migrators safe: the second waits, then finds nothing left to apply.
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

import psycopg

from . import config, db
from .sqlfile import queries

_FILE = re.compile(r"^(\d{3})_([a-z0-9_]+)\.sql$")
# Any stable 64-bit number; it only has to be unique among this database's advisory locks.
LOCK_KEY = 7_241_518_093


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    path: Path

    def sql(self) -> str:
        return self.path.read_text()


def available(sql_dir: Path | None = None) -> list[Migration]:
    found = []
    for path in sorted((sql_dir or config.SQL_DIR).iterdir()):
        match = _FILE.match(path.name)
        if match:
            found.append(Migration(int(match[1]), match[2], path))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"two migrations share a number: {versions}")
    return found


def applied(conn: psycopg.Connection) -> set[int]:
    q = queries("migrate")
    if not conn.execute(q["migrations_table_exists"]).fetchone()[0]:
        return set()
    return {row[0] for row in conn.execute(q["applied_versions"])}


def pending(conn: psycopg.Connection) -> list[Migration]:
    done = applied(conn)
    return [m for m in available() if m.version not in done]


def migrate(url: str | None = None, *, verbose: bool = False) -> list[Migration]:
    """Apply every pending migration; return those this call applied."""
    q = queries("migrate")
    done: list[Migration] = []
    with psycopg.connect(url or db.database_url(), autocommit=True) as conn:
        conn.execute(q["lock"], {"key": LOCK_KEY})
        try:
            conn.execute(q["create_migrations_table"])
            for migration in pending(conn):
                with conn.transaction():
                    conn.execute(migration.sql())
                    conn.execute(q["record"], {"version": migration.version,
                                               "name": migration.name})
                done.append(migration)
                if verbose:
                    print(f"applied {migration.path.name}")
        finally:
            conn.execute(q["unlock"], {"key": LOCK_KEY})
    if verbose and not done:
        print("migrations: nothing to apply")
    return done


def main() -> int:
    migrate(verbose=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
