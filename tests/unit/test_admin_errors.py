"""SQLSTATEs of the failed-jobs SQL functions map to 404/409 (api/errors.py) and to domain
exceptions (jobrunner.admin.sql_errors)."""
from __future__ import annotations

import psycopg.errors
import pytest

from api import errors as api_errors
from jobrunner import admin, errors


def test_api_maps_the_sql_functions_errors():
    status, body, headers = api_errors.describe(None, psycopg.errors.NoDataFound("no job with id 5"))
    assert (status, body["code"], headers) == (404, "job_not_found", {})
    status, body, _ = api_errors.describe(None, psycopg.errors.ObjectNotInPrerequisiteState("x"))
    assert (status, body["code"]) == (409, "conflict")
    assert set(body) == {"title", "description", "code"}


@pytest.mark.parametrize("raised, expected", [
    (psycopg.errors.NoDataFound, errors.JobNotFound),
    (psycopg.errors.ObjectNotInPrerequisiteState, errors.Conflict),
    (psycopg.errors.UniqueViolation, errors.Conflict),
    (psycopg.errors.InvalidParameterValue, errors.InvalidInput),
])
def test_sql_errors_become_domain_errors(raised, expected):
    with pytest.raises(expected):
        with admin.sql_errors(7):
            raise raised("message")


def test_other_errors_pass_through():
    with pytest.raises(psycopg.errors.DivisionByZero):
        with admin.sql_errors(7):
            raise psycopg.errors.DivisionByZero("x")
