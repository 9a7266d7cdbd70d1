"""Bearer tokens: the admin API always needs one, the report API when API_TOKEN is set.

- `/api/admin/...`: off (404, as if it did not exist) unless `ADMIN_TOKEN` is set; then
  every request needs `Authorization: Bearer <ADMIN_TOKEN>`.
- `/api/1.0/...` and `/api/2.0/...` (the reports): open unless `API_TOKEN` is set; then
  they need `Authorization: Bearer <API_TOKEN>`.
- Everything else (`/healthz`, `/readyz`, `/openapi.json`) stays open.

A missing or wrong token answers 401 with `WWW-Authenticate: Bearer realm=...` (RFC 6750;
`error="invalid_token"` when a token was sent). Tokens are compared with
hmac.compare_digest (constant time). The tokens are read once, when the app is created.

One middleware does it all (api/app.py installs it after the request-id middleware, so
401s carry the request id too); `secure_document()` adds the matching security
requirements and 401 responses to the OpenAPI document.
"""
from __future__ import annotations

import hmac

import falcon

from jobrunner import config

ADMIN_PREFIX = "/api/admin"
REPORT_PREFIXES = ("/api/1.0", "/api/2.0")

ADMIN_SCHEME = "adminToken"
API_SCHEME = "apiToken"


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")


def bearer_token(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header (scheme case-insensitive)."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


def token_matches(given: str | None, expected: str) -> bool:
    if given is None:
        return False
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


class AuthMiddleware:
    def __init__(self, admin_token: str | None, api_token: str | None) -> None:
        self.admin_token = admin_token or None
        self.api_token = api_token or None

    @classmethod
    def from_env(cls) -> "AuthMiddleware":
        return cls(config.env_str("ADMIN_TOKEN"), config.env_str("API_TOKEN"))

    async def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        path = req.path
        if _under(path, ADMIN_PREFIX):
            if self.admin_token is None:
                raise falcon.HTTPNotFound()  # the admin API is off
            self._check(req, self.admin_token, "jobrunner-admin")
        elif self.api_token is not None and any(_under(path, p) for p in REPORT_PREFIXES):
            self._check(req, self.api_token, "jobrunner")

    @staticmethod
    def _check(req: falcon.Request, expected: str, realm: str) -> None:
        header = req.get_header("Authorization")
        given = bearer_token(header)
        if token_matches(given, expected):
            return
        if header is None:
            description = "This endpoint needs an Authorization: Bearer <token> header."
            challenge = f'Bearer realm="{realm}"'
        else:
            description = "The bearer token is missing, malformed or wrong."
            challenge = f'Bearer realm="{realm}", error="invalid_token"'
        raise falcon.HTTPUnauthorized(description=description, challenges=[challenge],
                                      code="unauthorized")


# --- OpenAPI -----------------------------------------------------------------------------

OPENAPI = {
    "components": {
        "securitySchemes": {
            ADMIN_SCHEME: {
                "type": "http", "scheme": "bearer",
                "description": "The admin API's token (ADMIN_TOKEN). Without ADMIN_TOKEN "
                               "configured the admin routes answer 404.",
            },
            API_SCHEME: {
                "type": "http", "scheme": "bearer",
                "description": "The report API's token (API_TOKEN); required only when the "
                               "server sets API_TOKEN.",
            },
        },
    },
}


def secure_document(document: dict) -> dict:
    """Mark the report operations: optional bearer token (required when API_TOKEN is set)
    and a documented 401. Admin operations declare their own security (api/admin.py)."""
    for path, operations in document.get("paths", {}).items():
        if not any(_under(path, p) for p in REPORT_PREFIXES):
            continue
        for operation in operations.values():
            operation.setdefault("security", [{}, {API_SCHEME: []}])
            operation.setdefault("responses", {}).setdefault(
                "401", {"$ref": "#/components/responses/Unauthorized"})
    return document


def install(app, context) -> None:
    """No routes: the middleware is installed by api/app.py."""
