"""The benchmark harness's pure functions: percentiles, targets, wrk's output, the table.

(The harness itself runs end to end in CI as `make bench QUICK=1`.)
"""
from __future__ import annotations

import pytest

from bench.__main__ import table
from bench.common import distribution_ms, metric, percentile
from bench.http_load import parse_wrk

WRK_OUTPUT = """\
Running 10s test @ http://127.0.0.1:8000/api/2.0/report/payments
  2 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    12.01ms    3.20ms  80.10ms   90.00%
    Req/Sec     2.67k   200.00     3.00k    70.00%
  Latency Distribution
     50%   11.50ms
     75%   13.00ms
     90%   15.25ms
     99%  950.00us
  53412 requests in 10.01s, 12.34MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 7
Requests/sec:   5336.12
Transfer/sec:      1.23MB
"""


def test_percentile_interpolates_and_handles_edges():
    assert percentile([], 50) is None
    assert percentile([7.0], 99) == 7.0
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([4, 1, 3, 2], 0) == 1
    assert percentile([4, 1, 3, 2], 100) == 4
    assert percentile(list(range(101)), 99) == pytest.approx(99.0)


def test_distribution_in_milliseconds():
    dist = distribution_ms([0.001, 0.002, 0.003])
    assert dist["count"] == 3
    assert dist["p50_ms"] == pytest.approx(2.0)
    assert dist["max_ms"] == pytest.approx(3.0)
    assert distribution_ms([])["p99_ms"] is None


@pytest.mark.parametrize("value, op, target, met", [
    (10_001, ">=", 10_000, True), (9_999, ">=", 10_000, False),
    (4.9, "<=", 5.0, True), (5.1, "<=", 5.0, False),
    (1, "==", 1, True), (2, "==", 1, False), (0, "==", 1, False),
    (None, "<=", 5.0, False),
])
def test_metric_target_verdicts(value, op, target, met):
    assert metric("m", value, "u", target=target, op=op)["met"] is met


def test_metric_without_target_has_no_verdict():
    assert "met" not in metric("m", 3.0, "ms")


def test_parse_wrk_output():
    figures = parse_wrk(WRK_OUTPUT)
    assert figures["requests_per_s"] == pytest.approx(5336.12)
    assert figures["p50_ms"] == pytest.approx(11.5)
    assert figures["p99_ms"] == pytest.approx(0.95)      # microseconds converted
    assert figures["requests"] == 53412
    assert figures["non_2xx"] == 7
    assert figures["socket_errors"] == 3


def test_table_marks_misses_and_skips():
    report = {"scenarios": [
        {"name": "a", "scenario": "a", "status": "ok", "metrics": [
            metric("fast", 12_000.0, "jobs/s", target=10_000, op=">="),
            metric("slow", 30.0, "ms", target=25.0, op="<="),
            metric("plain", 3.0, "ms")]},
        {"name": "b", "status": "skipped", "reason": "v2 not available", "metrics": []},
        {"name": "c", "status": "error", "reason": "Boom: first line\nsecond line", "metrics": []},
    ]}
    text = table(report)
    lines = text.splitlines()
    assert any("fast" in line and line.rstrip().endswith("pass") for line in lines)
    assert any("slow" in line and line.rstrip().endswith("MISS") for line in lines)
    assert any("plain" in line and not line.rstrip().endswith(("pass", "MISS")) for line in lines)
    assert "v2 not available" in text
    assert "Boom: first line" in text and "second line" not in text
