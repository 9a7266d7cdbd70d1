"""The API's database access: one psycopg AsyncConnectionPool per worker process.

The pool is created closed and opened in the ASGI lifespan startup, i.e. inside each
gunicorn worker after the fork, and closed at lifespan shutdown. It opens without
waiting for the database: a worker starts (and answers /healthz) while the database is
down, and /readyz tells the truth. Every checkout is checked
(`AsyncConnectionPool.check_connection`), so connections broken by a database restart
are replaced on the spot and the restart is invisible to clients once the server is
back. While the database cannot be reached, `connection()` raises
`errors.DatabaseUnavailable`, which the error handler answers with 503 + Retry-After.
"""
from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import AsyncIterator

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from jobrunner import config, errors
from jobrunner import db as jobrunner_db

log = logging.getLogger("api.db")

APPLICATION_NAME = "jobrunner-api"


class Database:
    """The database of one API process: its URL and its connection pool."""

    def __init__(self, url: str | None = None) -> None:
        self._url = url
        self.pool: AsyncConnectionPool | None = None

    @property
    def url(self) -> str:
        """The database URL; resolved lazily so importing the app starts nothing."""
        if self._url is None:
            self._url = jobrunner_db.database_url()
        return self._url

    async def open(self) -> None:
        if self.pool is not None:
            return
        self.pool = AsyncConnectionPool(
            self.url,
            open=False,
            name="api",
            min_size=config.env_int("DB_POOL_MIN_SIZE", 1),
            max_size=config.env_int("DB_POOL_MAX_SIZE", 10),
            timeout=config.env_float("DB_POOL_TIMEOUT", 5.0),
            check=AsyncConnectionPool.check_connection,
            kwargs={
                "autocommit": True,
                "application_name": APPLICATION_NAME,
                "connect_timeout": config.env_int("DB_CONNECT_TIMEOUT", 5),
            },
        )
        # wait=False: the worker must start even when the database is down.
        await self.pool.open(wait=False)
        log.info("database pool opened (max %d connections)", self.pool.max_size)

    async def close(self) -> None:
        if self.pool is None:
            return
        pool, self.pool = self.pool, None
        await pool.close(timeout=5.0)
        log.info("database pool closed")

    @asynccontextmanager
    async def connection(self, timeout: float | None = None) -> AsyncIterator[psycopg.AsyncConnection]:
        """A pooled autocommit connection; DatabaseUnavailable when none can be had."""
        if self.pool is None:
            raise errors.DatabaseUnavailable("the database pool is not open")
        try:
            async with self.pool.connection(timeout=timeout) as conn:
                yield conn
        except PoolTimeout as exc:
            raise errors.DatabaseUnavailable("no database connection could be obtained") from exc
        except psycopg.OperationalError as exc:
            raise errors.DatabaseUnavailable(f"the database connection failed: {exc}") from exc
