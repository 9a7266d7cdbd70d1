"""A reusable LISTEN connection: one dedicated autocommit connection (never from a pool),
a callback per notification, reconnection with backoff.

    listener = Listener(url, ["jobrunner_done"], on_notify, on_reconnect=recheck)
    listener.start()          # a daemon thread
    ...
    listener.stop()

`callback(notify)` gets a psycopg.Notify (`.channel`, `.payload`, `.pid`) on the
listener's thread: keep it short (set an event; from asyncio code use
`loop.call_soon_threadsafe`). Notifications sent while the connection was down are
lost, so after every reconnection (not the first connection) `on_reconnect()` is called:
re-read whatever state the notifications stand for.
"""
from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterable

import psycopg
from psycopg import sql

from . import metrics

log = logging.getLogger("jobrunner.listener")


class Listener:
    def __init__(self, url: str, channels: Iterable[str],
                 callback: Callable[[psycopg.Notify], None], *,
                 on_reconnect: Callable[[], None] | None = None,
                 backoff: tuple[float, float] = (0.1, 5.0), check_every: float = 0.25,
                 name: str = "jobrunner-listener", role: str = "worker") -> None:
        self.url = url
        self.channels = list(channels)
        if not self.channels:
            raise ValueError("a listener needs at least one channel")
        self.callback = callback
        self.on_reconnect = on_reconnect
        self.backoff = backoff
        self.check_every = check_every
        self.name = name
        self.role = role                # label of jobrunner_listener_reconnects_total
        self.connected = threading.Event()
        self.reconnects = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: psycopg.Connection | None = None

    # --- lifecycle ------------------------------------------------------------------

    def start(self) -> "Listener":
        if self._thread is not None:
            raise RuntimeError("listener already started")
        self._thread = threading.Thread(target=self.run, name=self.name, daemon=True)
        self._thread.start()
        return self

    def wait_connected(self, timeout: float | None = None) -> bool:
        return self.connected.wait(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    # --- the loop ---------------------------------------------------------------------

    def _connect(self) -> psycopg.Connection:
        conn = psycopg.connect(self.url, autocommit=True, connect_timeout=10,
                               application_name=f"jobrunner-{self.role}-listener")
        for channel in self.channels:
            conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        return conn

    def run(self) -> None:
        """Listen until stop(); reconnects with exponential backoff on any error."""
        delay = self.backoff[0]
        first = True
        while not self._stop.is_set():
            try:
                self._conn = self._connect()
            except psycopg.Error as exc:
                log.warning("listener: cannot connect (%s); retrying in %.1fs", exc, delay)
                self._stop.wait(delay * random.uniform(0.8, 1.2))
                delay = min(self.backoff[1], delay * 2)
                continue
            delay = self.backoff[0]
            self.connected.set()
            if first:
                log.info("listener: listening on %s", ", ".join(self.channels))
            else:
                self.reconnects += 1
                metrics.LISTENER_RECONNECTS.labels(self.role).inc()
                log.info("listener: reconnected")
                self._call(self.on_reconnect)
            first = False
            try:
                self._listen(self._conn)
            except psycopg.Error as exc:
                if not self._stop.is_set():
                    log.warning("listener: connection lost (%s); reconnecting", exc)
            finally:
                self.connected.clear()
                try:
                    self._conn.close()
                except Exception:  # noqa: BLE001 - closing a broken connection
                    pass
                self._conn = None

    def _listen(self, conn: psycopg.Connection) -> None:
        while not self._stop.is_set():
            for notify in conn.notifies(timeout=self.check_every):
                self._call(self.callback, notify)
                if self._stop.is_set():
                    return
            # notifies() returns quietly on timeout; a dead socket raises. A server that
            # went away without closing the socket is noticed by this cheap round trip,
            # done at most once a second.
            now = time.monotonic()
            if now - getattr(self, "_last_ping", 0.0) >= 1.0:
                self._last_ping = now
                conn.execute("SELECT 1")

    def _call(self, fn, *args) -> None:
        if fn is None:
            return
        try:
            fn(*args)
        except Exception:  # noqa: BLE001 - a bad callback must not kill the listener
            log.exception("listener: callback failed")
