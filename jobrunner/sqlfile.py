"""Named SQL blocks loaded from sql/queries/*.sql.

A file holds blocks introduced by a line `-- name: some_name`; everything up to the
next such line is the query. Python code looks queries up by name and never builds
SQL from strings (identifiers go through psycopg.sql).
"""
from __future__ import annotations

import re
from functools import cache

from . import config

_NAME = re.compile(r"^--\s*name:\s*([A-Za-z_][A-Za-z0-9_]*)\s*$", re.MULTILINE)


def parse(text: str) -> dict[str, str]:
    queries: dict[str, str] = {}
    parts = _NAME.split(text)
    # parts = [preamble, name1, body1, name2, body2, ...]
    for name, body in zip(parts[1::2], parts[2::2]):
        if name in queries:
            raise ValueError(f"duplicate query name {name!r}")
        queries[name] = body.strip().rstrip(";").strip()
    return queries


@cache
def queries(module: str) -> dict[str, str]:
    """All named queries of sql/queries/<module>.sql."""
    return parse((config.SQL_DIR / "queries" / f"{module}.sql").read_text())


def query(module: str, name: str) -> str:
    return queries(module)[name]
