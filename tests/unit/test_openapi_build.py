"""api/openapi.py: parts merge into one document; clashes are refused."""
from __future__ import annotations

import types

import pytest

from api import openapi


def _module(name: str, part: dict):
    return types.SimpleNamespace(__name__=name, OPENAPI=part)


def _op(op_id: str) -> dict:
    return {"operationId": op_id, "responses": openapi.error_responses(404)}


def test_parts_merge_and_every_operation_takes_the_request_id():
    doc = openapi.build([
        _module("a", {"paths": {"/x": {"get": _op("getX")}},
                      "components": {"schemas": {"X": {"type": "object"}}}}),
        _module("b", {"paths": {"/x": {"post": _op("postX")}, "/y": {"get": _op("getY")}}}),
        types.SimpleNamespace(__name__="no_part"),
    ])
    assert set(doc["paths"]["/x"]) == {"get", "post"} and "/y" in doc["paths"]
    assert doc["components"]["schemas"]["X"] == {"type": "object"}
    assert "Error" in doc["components"]["schemas"]
    for op in (doc["paths"]["/x"]["get"], doc["paths"]["/y"]["get"]):
        assert {"$ref": "#/components/parameters/X-Request-ID"} in op["parameters"]
        assert set(op["responses"]) == {"404", "500"}
    assert "/x" not in openapi.BASE["paths"]  # BASE itself is never modified


def test_duplicate_operation_or_component_is_refused():
    with pytest.raises(ValueError, match="GET /x"):
        openapi.build([_module("a", {"paths": {"/x": {"get": _op("a")}}}),
                       _module("b", {"paths": {"/x": {"get": _op("b")}}})])
    with pytest.raises(ValueError, match="schemas/X"):
        openapi.build([_module("a", {"components": {"schemas": {"X": {"type": "object"}}}}),
                       _module("b", {"components": {"schemas": {"X": {"type": "array"}}}})])


def test_error_responses_refuse_unknown_statuses():
    with pytest.raises(KeyError):
        openapi.error_responses(418)
