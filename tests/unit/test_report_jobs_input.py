"""Report API v2 input checks and the JSON body of a job view (no database)."""
from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest

from api.report_jobs import JobView, check_idempotency_key, parse_job_id, parse_wait
from jobrunner import errors


@pytest.mark.parametrize("raw, expected", [("1", 1), ("42", 42), ("007", 7), ("0", 0),
                                           ("9223372036854775807", 2**63 - 1)])
def test_job_ids(raw, expected):
    assert parse_job_id(raw) == expected


@pytest.mark.parametrize("raw", ["", "abc", "-1", "+1", "1.0", "1e3", " 1", "1 ", "0x10",
                                 "9223372036854775808", "99999999999999999999", "١٢"])
def test_malformed_job_ids(raw):
    with pytest.raises(errors.InvalidJobId):
        parse_job_id(raw)


@pytest.mark.parametrize("values, expected", [(None, None), (["1"], 1.0), (["0.25"], 0.25),
                                              (["60"], 60.0), (["30"], 30.0)])
def test_waits(values, expected):
    assert parse_wait(values) == expected


@pytest.mark.parametrize("values", [["0"], ["-1"], ["61"], ["60.001"], ["abc"], [""], ["nan"],
                                    ["inf"], ["-inf"], ["1", "2"], ["1e400"], ["1e1"], ["١٢"], ["1_0"], ["0x1"]])
def test_bad_waits(values):
    with pytest.raises(errors.InvalidWait) as info:
        parse_wait(values)
    assert info.value.code == "invalid_wait"


def test_idempotency_keys():
    assert check_idempotency_key(None) is None
    for key in ("a", "0f8fad5b-d9cb-469f-a165-70867728950e", "k" * 255, "a.b_c:d+e/f=g-h"):
        assert check_idempotency_key(key) == key
    for key in ("", "k" * 256, "a b", "ké", "a;b", "a\nb", '"a"'):
        with pytest.raises(errors.InvalidIdempotencyKey):
            check_idempotency_key(key)


def _view(state: str, result_json: str | None = None) -> JobView:
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    return JobView(id=7, state=state, attempts=1, max_attempts=3, created_at=now,
                   started_at=now, finished_at=now if state == "succeeded" else None,
                   last_error=None, cancel_requested=False, result_json=result_json)


def test_body_splices_the_stored_result_unchanged():
    result = '{"data": [{"user_id": 1, "total_payment": 4294967294}]}'
    view = _view("succeeded", result)
    body = json.loads(view.body())
    assert body == {"data": view.data()}
    assert body["data"]["result"] == {"data": [{"user_id": 1, "total_payment": 4294967294}]}
    assert body["data"]["status_url"] == "/api/2.0/report/payments/7"
    assert view.final and view.body() is view.body()      # built once


def test_body_of_a_pending_job_has_no_result():
    view = _view("running", None)
    body = json.loads(view.body())
    assert "result" not in body["data"] and not view.final
    assert body["data"]["finished_at"] is None
    assert body["data"]["created_at"] == "2026-01-02T03:04:05+00:00"
