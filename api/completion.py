"""Job completion for long-polls: one LISTEN connection per API process, any number of
waiters.

    hub = CompletionHub(url_fn, fetch)        # fetch(ids) -> {id: view}; one query
    await hub.start(shutting_down)            # lifespan startup (after the fork)
    future = hub.register(job_id)             # before reading the job's state!
    view = await hub.read(job_id)             # coalesced with concurrent reads
    ...                                       # final: answer; else await future
    hub.discard(job_id, future)               # always (finally)
    await hub.stop()                          # lifespan shutdown

- The listener is one dedicated autocommit psycopg AsyncConnection (never from the
  pool) on the process's event loop, LISTENing on `jobrunner_done`, whose payload is
  `{"id": ..., "state": ...}`. Its application_name is `jobrunner-api-listener:<pid>`,
  so pg_stat_activity shows which process it belongs to.
- Dispatch is O(1) per notification: a dict lookup of the job id; ids that someone
  waits for are collected and fetched in one query per batch (up to `reads` batches in
  flight, oldest notifications first), and every waiter of each job is resolved with
  that one read (`view.final` only). Waiters hold no database connection while they
  wait; on the hot path nothing is done per waiter but resolving its future.
- Notifications sent while the listener was disconnected are lost, so after every
  (re)connection every job someone waits for is read again (one query), and as a
  safety net every `recheck_every` seconds too. Handlers also re-read at their
  deadline, so nothing waits past it or answers stale.
- Reads of a job's current state (a request arriving, a deadline) are coalesced too:
  whatever is asked while one query runs goes into the next, so thousands of clients
  arriving at once cost a few queries and a few pool checkouts, not thousands.
- When the process is told to stop (`shutting_down`), every waiter is answered with
  the job's current state (one query) and new waits answer at once.

A waiter's future resolves to a view (answer with it) or to WAKE (read the job
yourself: it vanished, or the batched read failed during shutdown).
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import random
from itertools import islice
from typing import Any, Awaitable, Callable, Iterable

import psycopg
from psycopg import sql

from jobrunner import config, metrics
from jobrunner.queue import DONE_CHANNEL

log = logging.getLogger("api.completion")

WAKE = object()   # "read the job yourself"


class CompletionHub:
    def __init__(self, url: Callable[[], str], fetch: Callable[[Iterable[int]], Awaitable[dict[int, Any]]],
                 *, channel: str = DONE_CHANNEL, ping_every: float = 5.0,
                 recheck_every: float = 30.0,
                 backoff: tuple[float, float] = (0.1, 2.0), batch: int = 1000,
                 reads: int = 4) -> None:
        self._url = url
        self._fetch = fetch
        self.channel = channel
        self.ping_every = ping_every
        self.recheck_every = recheck_every
        self.backoff = backoff
        self.batch = batch
        self.reads = max(1, reads)
        self._waiters: dict[int, set[asyncio.Future]] = {}
        self._pending: dict[int, None] = {}      # notified job ids, oldest first
        self._read_tasks: set[asyncio.Task] = set()
        self._retry_delay = backoff[0]
        self._wake: asyncio.Event | None = None
        self._reads: dict[int, list[asyncio.Future]] = {}
        self._read_task: asyncio.Task | None = None
        self._tasks: list[asyncio.Task] = []
        self.connected: asyncio.Event | None = None
        self.closed = False
        self.connects = 0
        self.notifications = 0

    @property
    def application_name(self) -> str:
        """Of the LISTEN connection; the pid is read at connect time (after the fork)."""
        return f"jobrunner-api-listener:{os.getpid()}"

    # --- waiters -------------------------------------------------------------------

    @property
    def waiting(self) -> int:
        """Number of waiters (for logs and tests)."""
        return sum(len(s) for s in self._waiters.values())

    def register(self, job_id: int) -> asyncio.Future:
        """A future resolved when job_id reaches a final state (or the process stops)."""
        future = asyncio.get_running_loop().create_future()
        if self.closed:
            future.set_result(WAKE)
            return future
        self._waiters.setdefault(job_id, set()).add(future)
        return future

    def discard(self, job_id: int, future: asyncio.Future) -> None:
        waiters = self._waiters.get(job_id)
        if waiters is not None:
            waiters.discard(future)
            if not waiters:
                del self._waiters[job_id]

    def _resolve(self, job_id: int, result: Any) -> None:
        for future in self._waiters.pop(job_id, ()):
            if not future.done():
                future.set_result(result)

    # --- coalesced reads ---------------------------------------------------------------

    async def read(self, job_id: int) -> Any:
        """The job's current view (None if there is no such job), read together with
        every other read asked for meanwhile: one query per round trip, whatever the
        number of requests arriving (or reaching their deadline) at once. Database
        errors are raised to every caller of the failed batch."""
        future = asyncio.get_running_loop().create_future()
        self._reads.setdefault(job_id, []).append(future)
        if self._read_task is None or self._read_task.done():
            self._read_task = asyncio.create_task(self._read_batches(), name="completion-reads")
        return await future

    async def _read_batches(self) -> None:
        while self._reads:
            batch, self._reads = self._reads, {}
            ids = list(batch)
            try:
                views: dict[int, Any] = {}
                for start in range(0, len(ids), self.batch):
                    views.update(await self._fetch(ids[start:start + self.batch]))
            except asyncio.CancelledError:
                for futures in batch.values():
                    for future in futures:
                        future.cancel()
                raise
            except Exception as exc:  # noqa: BLE001 - each caller gets it (e.g. a 503)
                for futures in batch.values():
                    for future in futures:
                        if not future.done():
                            future.set_exception(exc)
                continue
            for job_id, futures in batch.items():
                view = views.get(job_id)
                for future in futures:
                    if not future.done():
                        future.set_result(view)

    # --- notifications ---------------------------------------------------------------

    def on_notify(self, payload: str) -> None:
        """One `jobrunner_done` notification: O(1), no I/O."""
        self.notifications += 1
        try:
            job_id = int(json.loads(payload)["id"])
        except (ValueError, KeyError, TypeError):
            log.warning("listener: ignoring malformed notification %r", payload[:200])
            return
        if job_id in self._waiters:
            self._pending[job_id] = None
            self._wake.set()

    def recheck(self) -> None:
        """Read again every job someone waits for (after a reconnect)."""
        if self._waiters:
            self._pending.update(dict.fromkeys(self._waiters))
            self._wake.set()

    async def _reader(self) -> None:
        """Reads notified jobs in batches and answers their waiters. Up to `reads`
        batches are in flight at once: under load each read waits for the server's CPU,
        and notifications arriving meanwhile start the next read instead of queueing
        behind the one running (oldest notifications first)."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending and len(self._read_tasks) < self.reads:
                chunk = self._take_batch()
                if not chunk:
                    break
                task = asyncio.create_task(self._read_and_resolve(chunk), name="completion-read")
                self._read_tasks.add(task)
                task.add_done_callback(self._read_done)

    def _take_batch(self) -> list[int]:
        """Up to `batch` of the oldest pending ids that someone still waits for (the
        others are dropped), in O(batch) Python steps whatever the number pending."""
        chunk: list[int] = []
        while self._pending and len(chunk) < self.batch:
            for job_id in list(islice(self._pending, self.batch - len(chunk))):
                del self._pending[job_id]
                if job_id in self._waiters:
                    chunk.append(job_id)
        return chunk

    def _read_done(self, task: asyncio.Task) -> None:
        self._read_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("listener: a batched read failed", exc_info=task.exception())
        self._wake.set()      # a read slot is free: start the next batch, if any

    async def _read_and_resolve(self, chunk: list[int]) -> None:
        try:
            views = await self._fetch(chunk)
        except Exception as exc:  # noqa: BLE001 - the database may be down
            delay = self._retry_delay
            self._retry_delay = min(self.backoff[1], delay * 2)
            log.warning("listener: reading %d job(s) failed (%s); retrying in %.1fs",
                        len(chunk), exc, delay)
            await asyncio.sleep(delay)     # holds its read slot: no retry storm
            # back at the front: these were notified before anything pending now
            self._pending = {**dict.fromkeys(chunk), **self._pending}
            return
        self._retry_delay = self.backoff[0]
        for job_id in chunk:
            view = views.get(job_id)
            if view is None:
                self._resolve(job_id, WAKE)       # gone: let the handler say 404
            elif view.final:
                self._resolve(job_id, view)

    # --- the LISTEN connection ----------------------------------------------------------

    async def _connect(self) -> psycopg.AsyncConnection:
        conn = await psycopg.AsyncConnection.connect(
            self._url(), autocommit=True, application_name=self.application_name,
            connect_timeout=config.env_int("DB_CONNECT_TIMEOUT", 5),
            # TCP connections: notice a peer that vanished without a word.
            keepalives=1, keepalives_idle=10, keepalives_interval=5, keepalives_count=3)
        try:
            await conn.execute(self._listen_sql())
        except BaseException:
            await conn.close()
            raise
        return conn

    def _listen_sql(self) -> sql.Composed:
        return sql.SQL("LISTEN {}").format(sql.Identifier(self.channel))

    async def _listen(self) -> None:
        listen = self._listen_sql()
        delay = self.backoff[0]
        while True:
            try:
                conn = await self._connect()
            except (psycopg.Error, OSError) as exc:
                log.warning("listener: cannot connect (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(self.backoff[1], delay * 2)
                continue
            delay = self.backoff[0]
            self.connects += 1
            if self.connects > 1:
                metrics.LISTENER_RECONNECTS.labels("api").inc()
            self.connected.set()
            log.info("listener: listening on %s%s", self.channel,
                     " (reconnected: re-reading waited jobs)" if self.connects > 1 else "")
            # Whatever finished while nobody listened (or before the first LISTEN).
            self.recheck()
            loop = asyncio.get_running_loop()
            rechecked = loop.time()
            try:
                while True:
                    async for notify in conn.notifies(timeout=self.ping_every):
                        self.on_notify(notify.payload)
                    # Safety net (e.g. a proxy that drops notifications): now and then
                    # one query re-reads every waited job.
                    if loop.time() - rechecked >= self.recheck_every:
                        rechecked = loop.time()
                        self.recheck()
                    # A server that vanished without closing the socket shows up here.
                    # LISTEN again is a no-op round trip that keeps pg_stat_activity's
                    # `query` of this backend saying what it is for.
                    await asyncio.wait_for(conn.execute(listen), self.ping_every * 2)
            except (psycopg.Error, TimeoutError) as exc:
                log.warning("listener: connection lost (%s); reconnecting", exc)
            except Exception:  # noqa: BLE001 - never let the listener die
                log.exception("listener: unexpected error; reconnecting")
                await asyncio.sleep(delay)
            finally:
                self.connected.clear()
                try:
                    await conn.close()
                except Exception:  # noqa: BLE001 - closing a broken connection
                    pass

    # --- shutdown ----------------------------------------------------------------------

    async def release_all(self) -> None:
        """Answer every waiter with its job's current state (process stopping)."""
        self.closed = True
        ids = list(self._waiters)
        if not ids:
            return
        log.info("stopping: answering %d waiter(s) of %d job(s)", self.waiting, len(ids))
        for start in range(0, len(ids), self.batch):
            chunk = ids[start:start + self.batch]
            try:
                views = await self._fetch(chunk)
            except Exception as exc:  # noqa: BLE001
                log.warning("stopping: reading waited jobs failed (%s)", exc)
                views = {}
            for job_id in chunk:
                self._resolve(job_id, views.get(job_id, WAKE))
        for job_id in list(self._waiters):   # registered meanwhile
            self._resolve(job_id, WAKE)

    async def _watch_shutdown(self, shutting_down: asyncio.Event) -> None:
        await shutting_down.wait()
        await self.release_all()

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self, shutting_down: asyncio.Event | None = None) -> None:
        self._wake = asyncio.Event()
        self.connected = asyncio.Event()
        self.closed = False
        self._tasks = [asyncio.create_task(self._listen(), name="completion-listener"),
                       asyncio.create_task(self._reader(), name="completion-reader")]
        if shutting_down is not None:
            self._tasks.append(asyncio.create_task(self._watch_shutdown(shutting_down),
                                                   name="completion-shutdown"))

    async def stop(self) -> None:
        if not self.closed:
            await self.release_all()
        tasks, self._tasks = self._tasks, []
        tasks.extend(self._read_tasks)
        if self._read_task is not None:
            tasks.append(self._read_task)
            self._read_task = None
        for task in tasks:
            task.cancel()
        for task in tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception:  # noqa: BLE001
                log.exception("completion task %s failed", task.get_name())
