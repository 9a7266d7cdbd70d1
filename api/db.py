"""The API's database access: one psycopg AsyncConnectionPool per worker process.

The pool is created closed and opened in the ASGI lifespan startup, i.e. inside each
gunicorn worker after the fork, and closed at lifespan shutdown. It opens without
waiting for the database: a worker starts (and answers /healthz) while the database is
down, and /readyz tells the truth. Checkouts are checked (`Database._check`), so
connections broken by a database restart are replaced on the spot and the restart is
invisible to clients once the server is back. While the database cannot be reached,
`connection()` raises `errors.DatabaseUnavailable`, which the error handler answers with
503 + Retry-After.
"""
from __future__ import annotations

import asyncio
import logging
import select
import time
import weakref
from contextlib import asynccontextmanager
from typing import AsyncIterator

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from jobrunner import config, errors
from jobrunner import db as jobrunner_db

log = logging.getLogger("api.db")

APPLICATION_NAME = "jobrunner-api"

# A connection back in the pool for less than this is handed out again without a round
# trip to the server, unless the server has written to it meanwhile (see Database._check).
RECENT_USE_SECONDS = 5.0


def _has_input(conn: psycopg.AsyncConnection) -> bool:
    """Has the server sent something to this idle connection? A server that shuts down
    or terminates the backend says so (and closes the socket) before it goes away."""
    try:
        poller = select.poll()      # not select.select: descriptors may exceed 1023
        poller.register(conn.pgconn.socket, select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError, psycopg.OperationalError):
        return True


class Database:
    """The database of one API process: its URL and its connection pool.

    Recovery after an outage: psycopg_pool retries failed connection attempts with an
    exponential backoff, so once the database is back the pool may still sleep for many
    seconds before trying again. When a checkout times out, one direct connection
    attempt tells an outage (the database refuses: 503 at once, `degraded`) from a busy
    pool. While degraded, each request first probes the database directly (one probe at
    a time); the first probe that succeeds replaces the pool with a fresh one, which
    connects immediately. So requests fail fast during the outage and succeed as soon as
    the database is back.
    """

    def __init__(self, url: str | None = None) -> None:
        self._url = url
        self.pool: AsyncConnectionPool | None = None
        self.degraded = False
        self._probe_lock = asyncio.Lock()
        self._closing: set[asyncio.Task] = set()
        # When each pooled connection was last given back by a request (monotonic time).
        self._returned: weakref.WeakKeyDictionary[psycopg.AsyncConnection, float] = (
            weakref.WeakKeyDictionary())

    @property
    def url(self) -> str:
        """The database URL; resolved lazily so importing the app starts nothing."""
        if self._url is None:
            self._url = jobrunner_db.database_url()
        return self._url

    def _new_pool(self) -> AsyncConnectionPool:
        return AsyncConnectionPool(
            self.url,
            open=False,
            name="api",
            min_size=config.env_int("DB_POOL_MIN_SIZE", 1),
            max_size=config.env_int("DB_POOL_MAX_SIZE", 10),
            timeout=config.env_float("DB_POOL_TIMEOUT", 5.0),
            check=self._check,
            kwargs={
                "autocommit": True,
                "application_name": APPLICATION_NAME,
                "connect_timeout": config.env_int("DB_CONNECT_TIMEOUT", 5),
            },
        )

    async def _check(self, conn: psycopg.AsyncConnection) -> None:
        """The pool's check on checkout: a round trip to the server
        (`AsyncConnectionPool.check_connection`), except for a connection a request gave
        back less than RECENT_USE_SECONDS ago on which the server has sent nothing: the
        hot path of the API costs no extra round trip. A connection that fails anyway
        (the server vanished without a word) fails its query: that request answers 503
        and the pool discards the broken connection."""
        returned = self._returned.get(conn)
        if (returned is not None and time.monotonic() - returned < RECENT_USE_SECONDS
                and not _has_input(conn)):
            return
        await AsyncConnectionPool.check_connection(conn)

    async def open(self) -> None:
        if self.pool is not None:
            return
        self.pool = self._new_pool()
        # wait=False: the worker must start even when the database is down.
        await self.pool.open(wait=False)
        log.info("database pool opened (max %d connections)", self.pool.max_size)

    async def close(self) -> None:
        if self.pool is None:
            return
        pool, self.pool = self.pool, None
        await pool.close(timeout=5.0)
        for task in list(self._closing):
            await task
        log.info("database pool closed")

    async def _probe(self) -> bool:
        """Can a new connection be made right now?"""
        try:
            conn = await psycopg.AsyncConnection.connect(
                self.url, autocommit=True, application_name=APPLICATION_NAME,
                connect_timeout=config.env_int("DB_CONNECT_TIMEOUT", 5))
        except psycopg.Error:
            return False
        await conn.close()
        return True

    async def _renew_pool(self) -> None:
        old, self.pool = self.pool, self._new_pool()
        await self.pool.open(wait=False)
        if old is not None:
            task = asyncio.create_task(old.close(timeout=5.0))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def _usable_pool(self) -> AsyncConnectionPool:
        if self.pool is None:
            raise errors.DatabaseUnavailable("the database pool is not open")
        if not self.degraded:
            return self.pool
        async with self._probe_lock:
            if self.degraded:
                if not await self._probe():
                    raise errors.DatabaseUnavailable("the database cannot be reached")
                await self._renew_pool()
                self.degraded = False
                log.info("database reachable again: connection pool renewed")
        return self.pool

    @asynccontextmanager
    async def connection(self, timeout: float | None = None) -> AsyncIterator[psycopg.AsyncConnection]:
        """A pooled autocommit connection; DatabaseUnavailable when none can be had."""
        pool = await self._usable_pool()
        try:
            conn = await pool.getconn(timeout=timeout)
        except PoolTimeout as exc:
            if await self._probe():
                raise errors.DatabaseUnavailable("all database connections are busy") from exc
            self.degraded = True
            log.warning("database unreachable: requests answer 503 until it is back")
            raise errors.DatabaseUnavailable("the database cannot be reached") from exc
        try:
            yield conn
        except psycopg.OperationalError as exc:
            # The server's own words go to the log, not to the client.
            log.warning("database connection failed: %s", exc)
            raise errors.DatabaseUnavailable("the database connection failed") from exc
        finally:
            self._returned[conn] = time.monotonic()
            await pool.putconn(conn)
