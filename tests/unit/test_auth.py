"""Bearer-token parsing, comparison and path rules of api/auth.py (no server needed)."""
from __future__ import annotations

import asyncio

import falcon
import pytest
from falcon import testing

from api import auth


@pytest.mark.parametrize("header, token", [
    ("Bearer abc", "abc"), ("bearer abc", "abc"), ("BEARER  abc ", "abc"),
    (None, None), ("", None), ("abc", None), ("Basic abc", None), ("Bearer", None), ("Bearer  ", None),
])
def test_bearer_token(header, token):
    assert auth.bearer_token(header) == token


def test_token_matches():
    assert auth.token_matches("s3cret", "s3cret")
    assert not auth.token_matches("s3cre", "s3cret")
    assert not auth.token_matches(None, "s3cret")
    assert auth.token_matches("zürich", "zürich")      # non-ASCII compares as bytes


def _outcome(mw: auth.AuthMiddleware, path: str, authorization: str | None = None):
    headers = {"Authorization": authorization} if authorization else {}
    req = testing.create_asgi_req(path=path, headers=headers)
    try:
        asyncio.run(mw.process_request(req, None))
    except falcon.HTTPError as exc:
        return exc.status_code
    return "pass"


def test_paths_and_tokens():
    off = auth.AuthMiddleware(None, None)
    assert _outcome(off, "/api/admin/jobs", "Bearer x") == 404
    assert _outcome(off, "/api/admin", "Bearer x") == 404
    assert _outcome(off, "/api/1.0/report/payments") == "pass"
    assert _outcome(off, "/api/administrator") == "pass"     # a prefix, not a path segment
    on = auth.AuthMiddleware("adm", "rep")
    assert _outcome(on, "/api/admin/stats") == 401
    assert _outcome(on, "/api/admin/stats", "Bearer rep") == 401
    assert _outcome(on, "/api/admin/stats", "Bearer adm") == "pass"
    assert _outcome(on, "/api/2.0/report/payments/7") == 401
    assert _outcome(on, "/api/2.0/report/payments/7", "Bearer rep") == "pass"
    assert _outcome(on, "/healthz") == "pass"
    assert _outcome(on, "/openapi.json") == "pass"
    empty = auth.AuthMiddleware("", "")       # empty variables count as unset
    assert _outcome(empty, "/api/admin/jobs", "Bearer ") == 404
    assert _outcome(empty, "/api/1.0/report/payments") == "pass"


def test_secure_document_marks_report_operations_only():
    doc = {"paths": {"/api/1.0/report/payments": {"get": {"responses": {}}},
                     "/healthz": {"get": {"responses": {}}}}}
    auth.secure_document(doc)
    op = doc["paths"]["/api/1.0/report/payments"]["get"]
    assert op["security"] == [{}, {"apiToken": []}] and "401" in op["responses"]
    assert "security" not in doc["paths"]["/healthz"]["get"]
