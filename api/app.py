"""Builds the Falcon ASGI application served by gunicorn (`api.app:app`)."""
from __future__ import annotations

import falcon
import falcon.asgi
import psycopg

from jobrunner import db


class Health:
    async def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        try:
            async with await psycopg.AsyncConnection.connect(db.database_url(), connect_timeout=2) as conn:
                await conn.execute("SELECT 1")
            database = "ok"
        except psycopg.Error:
            database = "unreachable"
        resp.media = {"status": "ok", "database": database}


def create_app() -> falcon.asgi.App:
    app = falcon.asgi.App()
    app.add_route("/healthz", Health())
    return app


app = create_app()
