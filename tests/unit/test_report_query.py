"""The report reads orders with a plain projection: the summing happens in Python.

This guards the exercise: nobody may "optimise" the v1/v2 aggregation into SQL.
"""
from __future__ import annotations

import re

from jobrunner import config
from jobrunner.sqlfile import queries

AGGREGATES = ("sum", "count", "avg", "min", "max", "array_agg", "string_agg", "json_agg",
              "jsonb_agg", "json_object_agg", "jsonb_object_agg", "bool_and", "bool_or",
              "every", "bit_and", "bit_or", "stddev", "variance", "percentile_cont",
              "percentile_disc", "mode", "range_agg", "xmlagg", "row_number", "rank",
              "dense_rank", "lag", "lead", "first_value", "last_value", "ntile")
FORBIDDEN = [re.compile(rf"\b{name}\s*\(", re.IGNORECASE) for name in AGGREGATES] + [
    re.compile(r"\bgroup\s+by\b", re.IGNORECASE),
    re.compile(r"\bhaving\b", re.IGNORECASE),
    re.compile(r"\bover\s*\(", re.IGNORECASE),
    re.compile(r"\bwindow\b", re.IGNORECASE),
    re.compile(r"\bdistinct\b", re.IGNORECASE),
]


def _code(text: str) -> str:
    return re.sub(r"--[^\n]*", "", text)  # comments may say what the SQL must not do


def _offences(text: str) -> list[str]:
    return [p.pattern for p in FORBIDDEN if p.search(_code(text))]


def test_checker_catches_aggregates():
    for bad in ("SELECT user_id, sum(total) FROM orders GROUP BY user_id",
                "SELECT user_id, SUM (total) OVER (PARTITION BY user_id) FROM orders",
                "SELECT DISTINCT user_id FROM orders",
                "SELECT count(*) FROM orders"):
        assert _offences(bad), bad
    assert not _offences("SELECT user_id, total FROM orders -- no sum(), no GROUP BY")


def test_report_queries_hold_no_aggregate():
    report = queries("report")
    assert report, "sql/queries/report.sql has no named queries"
    for name, text in report.items():
        assert not _offences(text), f"report query {name!r} aggregates in SQL: {text}"


def test_the_projection_is_exactly_the_plain_one():
    plain = [re.sub(r"\s+", " ", _code(text)).strip() for text in queries("report").values()]
    assert any(q == "SELECT user_id, total FROM orders" for q in plain), plain
    for q in plain:
        if re.search(r"\bFROM\s+orders\b", q, re.IGNORECASE):
            assert re.search(r"\bSELECT\s+user_id,\s*total\s+FROM\s+orders\b", q, re.IGNORECASE), q


def test_aggregation_code_holds_no_sql_of_its_own():
    """The aggregation takes its SQL from sql/queries/report.sql, checked above."""
    source = (config.ROOT / "jobrunner" / "aggregate.py").read_text()
    code = "\n".join(line for line in source.splitlines() if not line.lstrip().startswith("#"))
    for literal in re.findall(r"\"[^\"\n]*\"|'[^'\n]*'", code):
        assert not re.search(r"\bfrom\s+orders\b|\bgroup\s+by\b", literal, re.IGNORECASE), literal
