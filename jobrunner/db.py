"""Which database, and plain connections to it."""
from __future__ import annotations

import os

import psycopg

from . import config


def database_url() -> str:
    """DATABASE_URL always wins; otherwise the embedded server (started if needed).

    The embedded URL is exported into os.environ so child processes reuse it.
    """
    url = config.env_str("DATABASE_URL")
    if url:
        return url
    from . import embedded

    url = embedded.start()
    os.environ["DATABASE_URL"] = url
    return url


def connect(url: str | None = None, **kwargs) -> psycopg.Connection:
    return psycopg.connect(url or database_url(), **kwargs)
