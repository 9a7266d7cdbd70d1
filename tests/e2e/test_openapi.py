"""The served OpenAPI document tells the truth: real responses validate against it.

Add an exchange to EXCHANGES-like lists in your own test (see `check_exchange`) when you
add an endpoint; `test_every_route_is_documented` fails for a route without an entry.
"""
from __future__ import annotations

import psycopg
import pytest
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from api import openapi
from api.app import MODULES, create_app
from jobrunner.migrate import migrate

pytestmark = pytest.mark.e2e

BASE_URI = "urn:jobrunner-openapi"
METHODS = ("get", "put", "post", "delete", "patch", "head", "options")


def _escape(token: str) -> str:
    return token.replace("~", "~0").replace("/", "~1")


class OpenAPI:
    def __init__(self, document: dict) -> None:
        self.doc = document
        resource = Resource.from_contents(document, default_specification=DRAFT202012)
        self.registry = Registry().with_resource(BASE_URI, resource)

    def resolve(self, pointer: list[str]) -> tuple[dict, list[str]]:
        node = self.doc
        for token in pointer:
            node = node[token]
        while isinstance(node, dict) and "$ref" in node:
            ref = node["$ref"]
            assert ref.startswith("#/"), ref
            pointer = [t.replace("~1", "/").replace("~0", "~") for t in ref[2:].split("/")]
            node = self.doc
            for token in pointer:
                node = node[token]
        return node, pointer

    def validate(self, pointer: list[str], instance) -> None:
        ref = BASE_URI + "#/" + "/".join(_escape(t) for t in pointer)
        Draft202012Validator({"$ref": ref}, registry=self.registry).validate(instance)

    def match(self, path: str) -> str | None:
        """The path template of the document matching a concrete path."""
        parts = path.split("/")
        for template in self.doc["paths"]:
            tparts = template.split("/")
            if len(tparts) == len(parts) and all(
                    t == p or (t.startswith("{") and t.endswith("}") and p) for t, p in zip(tparts, parts)):
                return template
        return None


def check_exchange(api: OpenAPI, method: str, path: str, resp) -> None:
    """Validate one real response (httpx) against the document."""
    template = api.match(path.split("?")[0])
    if template is None or method.lower() not in api.doc["paths"][template]:
        # Unknown route (404) or method (405): the shared Error schema.
        assert resp.status_code in (404, 405), (method, path, resp.status_code)
        api.validate(["components", "schemas", "Error"], resp.json())
        return
    responses_ptr = ["paths", template, method.lower(), "responses"]
    responses, _ = api.resolve(responses_ptr)
    key = str(resp.status_code) if str(resp.status_code) in responses else "default"
    assert key in responses, f"{method} {template}: {resp.status_code} is not documented"
    response, pointer = api.resolve(responses_ptr + [key])
    for name in response.get("headers", {}):
        assert name.lower() in resp.headers, f"{method} {path} {resp.status_code}: no {name} header"
    content = response.get("content")
    if content:
        media = resp.headers["content-type"].split(";")[0].strip()
        assert media in content, f"{method} {path}: {media} not documented"
        api.validate(pointer + ["content", media, "schema"], resp.json())
    else:
        assert not resp.content, f"{method} {path}: undocumented body"


def test_document_is_well_formed():
    doc = openapi.build(MODULES)
    assert doc["openapi"].startswith("3.1.")
    ids = []
    for path, operations in doc["paths"].items():
        assert path.startswith("/")
        for method, operation in operations.items():
            assert method in METHODS
            ids.append(operation["operationId"])
            assert operation["responses"]
    assert len(ids) == len(set(ids)), "duplicate operationId"
    for name, schema in doc["components"]["schemas"].items():
        Draft202012Validator.check_schema(schema)
    # Every $ref resolves.
    api = OpenAPI(doc)

    def walk(node, pointer):
        if isinstance(node, dict):
            if "$ref" in node:
                api.resolve(pointer)
            for key, value in node.items():
                walk(value, pointer + [key])
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, pointer + [i])
    walk(doc, [])


class FakeResponse:
    def __init__(self, status_code: int, body, headers: dict) -> None:
        self.status_code, self._body = status_code, body
        self.headers = {k.lower(): v for k, v in headers.items()}
        self.content = b"x"

    def json(self):
        return self._body


def test_check_exchange_rejects_lies():
    """The checker itself can fail: wrong shapes, undocumented statuses, missing headers."""
    api = OpenAPI(openapi.build(MODULES))
    ok = {"content-type": "application/json", "X-Request-ID": "r"}
    check_exchange(api, "GET", "/api/1.0/report/payments",
                   FakeResponse(200, {"data": [{"user_id": 1, "total_payment": 2}]}, ok))
    bad = [
        (200, {"data": [{"user_id": 1, "total_payment": "2"}]}, ok),        # string total
        (200, {"data": [{"user_id": 1}]}, ok),                               # missing field
        (200, {"data": [], "extra": 1}, ok),                                 # extra field
        (200, {"data": []}, {"content-type": "application/json"}),           # no X-Request-ID
        (503, {"title": "t", "description": "d", "code": "c"}, ok),          # no Retry-After
        (418, {"title": "t", "description": "d", "code": "c"}, ok),          # undocumented status
    ]
    for status, body, headers in bad:
        with pytest.raises(Exception):
            check_exchange(api, "GET", "/api/1.0/report/payments", FakeResponse(status, body, headers))


def _app_routes(app) -> set[tuple[str, str]]:
    """(uri_template, method) of every responder a resource defines (not Falcon's defaults)."""
    found = set()

    def walk(nodes):
        for node in nodes:
            if node.method_map:
                for method, responder in node.method_map.items():
                    if getattr(responder, "__name__", "").startswith("on_"):
                        found.add((node.uri_template, method.lower()))
            walk(node.children)
    walk(app._router._roots)
    return found


def test_every_route_is_documented():
    app = create_app("postgresql://unused@127.0.0.1:9/none")
    doc = openapi.build(MODULES)
    routes = _app_routes(app)
    assert ("/api/1.0/report/payments", "get") in routes
    documented = {(path, method) for path, ops in doc["paths"].items() for method in ops}
    assert routes - documented == set(), "routes without an OpenAPI entry"
    assert documented - routes == set(), "OpenAPI entries without a route"


def test_real_responses_match_the_document(new_database, gunicorn):
    url = new_database(migrated=False)
    server = gunicorn(url)
    with server.client() as http:
        api = OpenAPI(http.get("/openapi.json").json())
        exchanges = []

        def call(method: str, path: str):
            resp = http.request(method, path)
            exchanges.append((method, path, resp.status_code))
            check_exchange(api, method, path, resp)
            return resp

        call("GET", "/openapi.json")
        call("GET", "/healthz")
        assert call("GET", "/readyz").status_code == 503
        assert call("GET", "/api/1.0/report/payments").status_code == 503
        migrate(url)
        assert call("GET", "/readyz").status_code == 200
        assert call("GET", "/api/1.0/report/payments").json() == {"data": []}
        with psycopg.connect(url) as conn:
            conn.execute("INSERT INTO orders (user_id, total) VALUES (1, 10), (1, 5), (2147483647, 2147483647),"
                         " (2147483647, 2147483647)")
        assert call("GET", "/api/1.0/report/payments").json() == {"data": [
            {"user_id": 1, "total_payment": 15}, {"user_id": 2147483647, "total_payment": 4294967294}]}
        assert call("GET", "/nope").status_code == 404
        assert call("POST", "/api/1.0/report/payments").status_code == 405
        assert call("PUT", "/healthz").status_code == 405
    statuses = {status for _, _, status in exchanges}
    assert {200, 404, 405, 503} <= statuses
