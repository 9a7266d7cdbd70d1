"""The payments report: total of the orders per user, summed in Python.

SQL only projects (`SELECT user_id, total FROM orders`, sql/queries/report.sql); the
sums happen here. Parsing rows one at a time in Python is far too slow for millions of
rows, so:

* the rows arrive as text COPY ("user_id<TAB>total<LF>"), received in blocks by
  asyncpg (psycopg hands out one CopyData message, i.e. one row, per call). Text, not
  binary: for two small integers the server spends less CPU writing text, and when
  the server shares the machine, its CPU is what bounds the report's time;
* blocks are parsed in bulk with numpy (see TextCopyParser): the positions of the
  tabs and newlines give every field's end and length, and each field's digits are
  read as one 8-byte word and combined pairwise (SWAR); every byte is checked, so
  anything but rows of two integers in the int4 range is an error, never a wrong sum;
* per batch, user ids are counted with `np.bincount` (dense id span) or sorted and
  reduced (sparse ids), and added into int64 accumulators: sums never overflow and
  stay exact (see `_Accumulator`);
* the table is split into block (ctid) ranges read in parallel on several
  connections, all in one exported REPEATABLE READ snapshot, so the parts add up to
  one consistent picture of the table even while others write to it. A table small
  enough for one part is read by one plain autocommit COPY instead (one statement
  reads one snapshot by itself).

Memory is bounded by the block and batch sizes, the number of connections and the
number of distinct users, never by the number of rows.

Connections are kept across calls: opening one costs the server a backend start and
an authentication (~5 ms of its CPU), more than the whole report of a small table.
Each process runs one event loop in a daemon thread (started on first use, and anew
in a forked child, which leaves the parent's untouched), holding an asyncpg pool per
URL (POOL_SIZE connections at most, none kept open when idle for IDLE_SECONDS).
`payments()` stays synchronous: it hands the work to that loop and waits. Concurrent
calls share the pool: a call waits for its first connection only and splits the
table into as many parts as it then gets connections (see _Pool), so calls never
wait on each other's half-acquired connections. A parallel read locks the table and
exports its own snapshot in its own transactions, always ended, and sets only
transaction-local settings, so a connection goes back to the pool with no session
state (asyncpg still rolls back a transaction left open; see _keep_session). A pooled
connection that died while idle (server restart) fails on the call's first statement:
the pool drops its idle connections and the call starts over once, on new ones. A
connection lost later is an error (errors.DatabaseUnavailable), as is one that cannot
be opened. Pools are closed at interpreter exit.
"""
from __future__ import annotations

import asyncio
import atexit
import os
import threading
import weakref

import asyncpg
import numpy as np
from psycopg import sql

from . import config, errors
from .db import asyncpg_connect_kwargs
from .sqlfile import queries

BATCH_ROWS = 1 << 17                    # rows summed at a time
BLOCK_BYTES = 1 << 16                   # COPY text parsed at a time
# float64 bincount weights are exact while every partial sum stays below 2**53; a batch
# holds at most 2**22 rows whose |total| < 2**31, so its sums stay below 2**53.
MAX_BATCH_ROWS = 1 << 22
DENSE_SPAN = 1 << 21                    # dense accumulator covers at most this many ids
MERGE_PAIRS = 1 << 20                   # fold sparse partial results beyond this many
MAX_PARTS = 16
MIN_PART_BLOCKS = 512                   # 4 MB of heap; smaller tables use fewer connections
POOL_SIZE = MAX_PARTS                   # pooled connections per URL and process, at most
IDLE_SECONDS = 60.0                     # a pooled connection idle this long is closed


def default_parallelism() -> int:
    """Connections reading in parallel: REPORT_PARALLELISM, else 2 per core, 2..MAX_PARTS."""
    configured = config.env_int("REPORT_PARALLELISM", 0)
    if configured > 0:
        return min(configured, MAX_PARTS)
    return max(2, min(MAX_PARTS, 2 * (os.cpu_count() or 1)))


class _Accumulator:
    """Per-user int64 sums, fed with batches of (user_id, total) arrays.

    Dense ids go to `np.bincount` over a window of at most DENSE_SPAN ids; other
    batches are sorted and reduced with `np.add.reduceat` in int64 (exact). A user
    counts as present when its sum is non-zero or when it had a total <= 0 (totals
    are >= 0 by the table's CHECK, so zero totals are the only way to a zero sum;
    negative ones are handled the same way should the constraint ever go).
    """

    def __init__(self):
        self.base: int | None = None
        self.dense = np.zeros(0, np.int64)
        self.seen = np.zeros(0, np.bool_)
        self.pending: list[tuple[np.ndarray, np.ndarray]] = []
        self.pending_pairs = 0
        self.keys = np.zeros(0, np.int64)
        self.sums = np.zeros(0, np.int64)

    def add(self, user_ids: np.ndarray, totals: np.ndarray) -> None:
        if not len(user_ids):
            return
        if len(user_ids) > MAX_BATCH_ROWS:
            for start in range(0, len(user_ids), MAX_BATCH_ROWS):
                self.add(user_ids[start:start + MAX_BATCH_ROWS], totals[start:start + MAX_BATCH_ROWS])
            return
        lo, hi = int(user_ids.min()), int(user_ids.max())
        if self.base is None:
            # ids from 0 need no shift; otherwise the window starts at the first batch's min
            self.base = 0 if hi < DENSE_SPAN else lo
        if lo >= self.base and hi - self.base < DENSE_SPAN:
            self._add_dense(user_ids, totals, hi)
        else:
            self._add_sparse(user_ids, totals)

    def _add_dense(self, user_ids, totals, hi) -> None:
        index = user_ids - self.base if self.base else user_ids
        size = hi - self.base + 1
        if size > len(self.dense):
            grown = max(size, min(DENSE_SPAN, 2 * len(self.dense)))
            self.dense = np.concatenate([self.dense, np.zeros(grown - len(self.dense), np.int64)])
            self.seen = np.concatenate([self.seen, np.zeros(grown - len(self.seen), np.bool_)])
        weights = totals if totals.dtype == np.float64 else totals.astype(np.float64)
        sums = np.bincount(index, weights=weights)
        self.dense[:len(sums)] += sums.astype(np.int64)
        special = totals <= 0
        if special.any():
            self.seen[index[special]] = True

    def _add_sparse(self, user_ids, totals) -> None:
        keys, sums = _reduce(user_ids.astype(np.int64), totals.astype(np.int64))
        self.pending.append((keys, sums))
        self.pending_pairs += len(keys)
        if self.pending_pairs > max(MERGE_PAIRS, 2 * len(self.keys)):
            self._fold()

    def _fold(self) -> None:
        if self.pending:
            self.keys, self.sums = _reduce(
                np.concatenate([self.keys, *(k for k, _ in self.pending)]),
                np.concatenate([self.sums, *(s for _, s in self.pending)]))
            self.pending, self.pending_pairs = [], 0

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(user_ids, sums) sorted by user id, int64."""
        self._fold()
        present = np.flatnonzero((self.dense != 0) | self.seen)
        keys = present.astype(np.int64) + (self.base or 0)
        sums = self.dense[present]
        if len(self.keys):
            keys, sums = _reduce(np.concatenate([keys, self.keys]), np.concatenate([sums, self.sums]))
        return keys, sums


def _reduce(keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sum int64 values per key, exactly: (sorted distinct keys, sums)."""
    if not len(keys):
        return keys, values
    order = np.argsort(keys, kind="stable")
    keys, values = keys[order], values[order]
    starts = np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1]]))
    return keys[starts], np.add.reduceat(values, starts)


PAD = 16                                # bytes before the data: a field's words reach back 16
NEWLINE = 10
MAX_DIGITS = 10                         # 2147483647
MAX_ROW_BYTES = 2 * (MAX_DIGITS + 2)    # two signed int4 fields, a tab and a newline
INT4_MIN, INT4_MAX = -2**31, 2**31 - 1
ROW_SEPARATORS = 0x0A09                 # b"\t\n" read as a little-endian uint16
ASCII_ZEROS = np.uint64(0x3030303030303030)
# KEEP[n]: of a little-endian 8-byte word, the last min(n, 8) bytes (its top bytes)
KEEP = np.array([0] + [(1 << 64) - (1 << (8 * (8 - n))) for n in range(1, 9)] + [(1 << 64) - 1] * 8,
                np.uint64)


class TextCopyParser:
    """Parse the text COPY output of a two-int4 projection ("user_id<TAB>total<LF>" rows) in bulk.

    `feed()` takes chunks of any size, split anywhere. They are copied into a text
    buffer of `block_bytes`; each time it fills, all its complete rows are parsed at
    once with numpy (see _parse_block) and the bytes after the last newline move to
    the front. User ids (intp) and totals (float64, exact for int4) are gathered into
    `batch_rows`-long arrays handed to `sink(user_ids, totals)`; the arrays are reused,
    so the sink must not keep them. Every array is allocated once, up front: besides
    flat memory, this spares the page faults of allocating and freeing large
    temporaries per block, which cost more CPU than the parsing itself.

    `close()` parses the rest and checks the stream ended with a whole row. Anything
    but rows of two integers in the int4 range (NULLs, other columns, other types, a
    cut stream) raises errors.ReportDataError rather than producing wrong sums (the
    caller also compares the row count with the server's, see _copy_part).
    """

    def __init__(self, sink, batch_rows: int = BATCH_ROWS, block_bytes: int = BLOCK_BYTES):
        self.sink = sink
        self.capacity = max(1, min(batch_rows, MAX_BATCH_ROWS))
        self.user_ids = np.empty(self.capacity, np.intp)
        self.totals = np.empty(self.capacity, np.float64)
        self.filled = 0
        block = max(block_bytes, 2 * MAX_ROW_BYTES)
        self.text = np.full(PAD + block, NEWLINE, np.uint8)   # PAD bytes, then the data
        self.used = 0                                          # data bytes in self.text
        # words[i]: the 8 bytes from position i on, as a little-endian word (unaligned view)
        self.words = np.ndarray((PAD + block - 7,), "<u8", self.text, strides=(1,))
        self.digits = np.empty(block, np.uint8)
        self.non_digit = np.empty(block, np.bool_)
        fields = block // 2                                    # a field takes >= 2 bytes
        self.lengths = np.empty(fields, np.intp)
        self.values = np.empty(fields, np.uint64)
        self.keep = np.empty(fields, np.uint64)
        self.rows = 0

    def feed(self, chunk) -> None:
        data = np.frombuffer(chunk, np.uint8)
        while len(data):
            take = min(len(data), len(self.text) - PAD - self.used)
            self.text[PAD + self.used:PAD + self.used + take] = data[:take]
            self.used += take
            data = data[take:]
            if PAD + self.used == len(self.text):
                self._parse_block()

    def close(self) -> int:
        """Parse what is left; flush; return the number of rows parsed."""
        self._parse_block()
        if self.used:
            raise errors.ReportDataError("COPY stream cut short: its last row is incomplete")
        self._flush()
        return self.rows

    def _parse_block(self) -> None:
        used = self.used
        # '0'..'9' -> 0..9, every other byte to 10..255
        np.subtract(self.text[PAD:PAD + used], np.uint8(48), out=self.digits[:used])
        np.greater(self.digits[:used], 9, out=self.non_digit[:used])
        seps = np.flatnonzero(self.non_digit[:used])
        complete = len(seps) - len(seps) % 2       # separators of the complete rows
        seps = seps[:complete]
        seps += PAD
        # every non-digit must be, in turn, a tab and a newline (rows "digits<TAB>digits<LF>")
        if complete and not (np.take(self.text, seps, out=self.digits[:complete], mode="clip")
                             .view("<u2") == ROW_SEPARATORS).all():
            return self._parse_signed_block()
        if not complete:
            if used == len(self.text) - PAD:
                raise errors.ReportDataError("row too long for two int4 columns in COPY data")
            return
        if complete > len(self.lengths):    # more separators than rows of digits hold
            raise errors.ReportDataError("empty field in COPY data")
        values = _fields(self.words, seps, self.lengths[:complete], self.values[:complete],
                         self.keep[:complete])
        self._rows(values)
        rest = seps[-1] + 1
        self.text[PAD:PAD + PAD + used - rest] = self.text[rest:PAD + used]
        self.used = PAD + used - rest

    def _parse_signed_block(self) -> None:
        """The block holds something else than digits, tabs and newlines: minus signs
        (negative user ids are valid) or bad data. Parsed with temporary arrays."""
        data = self.text[:PAD + self.used].tobytes()
        end = data.rfind(b"\n", PAD) + 1
        if end:
            self._rows(_signed_rows(data, end))
        rest = end or PAD
        if len(data) - rest > MAX_ROW_BYTES:
            raise errors.ReportDataError("row too long for two int4 columns in COPY data")
        self.text[PAD:PAD + len(data) - rest] = np.frombuffer(data, np.uint8)[rest:]
        self.used = len(data) - rest

    def _rows(self, values: np.ndarray) -> None:
        user_ids, totals = values[0::2], values[1::2]
        self.rows += len(user_ids)
        while len(user_ids):
            take = min(len(user_ids), self.capacity - self.filled)
            end = self.filled + take
            self.user_ids[self.filled:end] = user_ids[:take]
            self.totals[self.filled:end] = totals[:take]
            self.filled = end
            user_ids, totals = user_ids[take:], totals[take:]
            if self.filled == self.capacity:
                self._flush()

    def _flush(self) -> None:
        if self.filled:
            self.sink(self.user_ids[:self.filled], self.totals[:self.filled])
            self.filled = 0


def _signed_rows(data: bytes, end: int) -> np.ndarray:
    """Field values (int64, user id and total alternating) of the rows in data[PAD:end]
    that may hold minus signs: each '-' must start a field and precede a digit; it is
    read as a leading 0, and the field negated."""
    raw = np.frombuffer(data, np.uint8, count=end).copy()
    minus = np.flatnonzero(raw[PAD:] == 45)
    minus += PAD
    if not (np.isin(raw[minus - 1], (9, 10)).all() and (raw[minus + 1] - np.uint8(48) <= 9).all()):
        raise errors.ReportDataError(
            "unexpected bytes in COPY data (expected rows of two int4 NOT NULL columns)")
    raw[minus] = 48
    seps = np.flatnonzero(raw[PAD:] - np.uint8(48) > 9)
    seps += PAD
    if len(seps) % 2 or not (raw[seps].view("<u2") == ROW_SEPARATORS).all():
        raise errors.ReportDataError(
            "unexpected bytes in COPY data (expected rows of two int4 NOT NULL columns)")
    words = np.ndarray((len(raw) - 7,), "<u8", raw, strides=(1,))
    n = len(seps)
    values = _fields(words, seps, np.empty(n, np.intp), np.empty(n, np.uint64),
                     np.empty(n, np.uint64), MAX_DIGITS + 1, -INT4_MIN)
    negative = np.searchsorted(seps, minus)
    values[negative] = -values[negative]
    if len(values) and values.max() > INT4_MAX:
        raise errors.ReportDataError("value out of the int4 range in COPY data")
    return values


def _fields(words, seps, lengths, values, keep, max_digits: int = MAX_DIGITS,
            max_value: int = INT4_MAX) -> np.ndarray:
    """Values (int64) of the digit fields ending at `seps`, each starting after the one
    before (the first at PAD): 1..max_digits digits, values <= max_value. `lengths`,
    `values` and `keep` are work arrays as long as `seps`."""
    lengths[0] = seps[0] - PAD
    np.subtract(seps[1:], seps[:-1], out=lengths[1:])
    lengths[1:] -= 1
    if lengths.min() < 1:
        raise errors.ReportDataError("empty field in COPY data")
    longest = int(lengths.max())
    if longest > max_digits:
        raise errors.ReportDataError("value out of the int4 range in COPY data")
    _last8(words, seps, lengths, values, keep)
    if longest > 8:
        long = np.flatnonzero(lengths > 8)
        n = len(long)
        high = _last8(words, seps[long] - 8, lengths[long] - 8, np.empty(n, np.uint64),
                      np.empty(n, np.uint64))
        values[long] += high * np.uint64(10**8)
    values = values.view(np.int64)
    if longest >= MAX_DIGITS and values.max() > max_value:
        raise errors.ReportDataError("value out of the int4 range in COPY data")
    return values


def _last8(words, ends, lengths, x, keep) -> np.ndarray:
    """Into x: the value of the last min(length, 8) digits before each end, all at once:
    the 8 bytes before the end are read as one little-endian word, its bytes turned into
    digits (those before the field zeroed) and combined pairwise (SWAR)."""
    starts = np.subtract(ends, 8, out=keep.view(np.intp))
    np.take(words, starts, out=x, mode="clip")
    x ^= ASCII_ZEROS
    x &= np.take(KEEP, lengths, out=keep, mode="clip")
    x *= np.uint64(10 * 256 + 1)                # byte pairs -> 10 * first + second
    x >>= np.uint64(8)
    x &= np.uint64(0x00FF00FF00FF00FF)
    x *= np.uint64(100 * 65536 + 1)             # 16-bit pairs -> 100 * first + second
    x >>= np.uint64(16)
    x &= np.uint64(0x0000FFFF0000FFFF)
    x *= np.uint64(10000 * (1 << 32) + 1)       # 32-bit pairs -> 10000 * first + second
    x >>= np.uint64(32)
    return x


# ---------------------------------------------------------------------------------------

MAX_TID = "(4294967295,65535)"            # above every real tuple id


def _ctid(block: int | None) -> str:
    return MAX_TID if block is None else f"({block},0)"


def split_blocks(nblocks: int, parts: int, min_blocks: int = 1) -> list[tuple[int, int | None]]:
    """Split blocks 0..nblocks into at most `parts` contiguous ranges of at least
    `min_blocks` blocks; the last is open-ended (None), so rows in blocks added after
    the count are still read (and, being newer than the snapshot, skipped)."""
    parts = max(1, min(parts, nblocks // max(1, min_blocks)))
    bounds = [nblocks * i // parts for i in range(parts)]
    return [(lo, hi) for lo, hi in zip(bounds, [*bounds[1:], None])]


async def _copy_part(conn, query: str, acc: _Accumulator, batch_rows: int) -> int:
    parser = TextCopyParser(acc.add, batch_rows)

    failure: list[Exception] = []

    async def output(chunk):
        # An exception escaping this callback leaves asyncpg waiting forever (the
        # server has finished, the client never returns): keep the first error and
        # raise it once the COPY is over.
        if not failure:
            try:
                parser.feed(chunk)
            except Exception as exc:  # noqa: BLE001 - re-raised below
                failure.append(exc)

    status = await conn.copy_from_query(query, output=output, format="text")
    if failure:
        raise failure[0]
    rows = parser.close()
    expected = int(status.split()[-1])
    if rows != expected:
        raise errors.ReportDataError(f"parsed {rows} rows, server sent {expected}")
    return rows


_CONNECTION_ERRORS = (OSError, asyncio.TimeoutError, asyncpg.exceptions.CannotConnectNowError,
                      asyncpg.exceptions.TooManyConnectionsError,
                      asyncpg.exceptions.ConnectionDoesNotExistError,
                      asyncpg.exceptions.AdminShutdownError)


class _StaleConnection(Exception):
    """A pooled connection failed on its first statement of a call: it died idle."""


async def _keep_session(conn) -> None:
    """The pool's reset on release, instead of asyncpg's default (advisory unlock, CLOSE
    ALL, UNLISTEN, RESET ALL: one more round trip and four statements per release). A
    read here leaves no session state: it runs in transactions (asyncpg rolls back one
    left open before this is called) or in one autocommit COPY, and sets only
    transaction-local settings (SET LOCAL, set_config(..., true))."""


class _Pool:
    """An asyncpg pool for one URL, with its own count of free connections.

    asyncpg's pool makes callers wait for a free connection; a call needing several
    would then risk waiting for connections held by others that wait as well. So a
    call waits only for its first connection (`take`), then takes what is free of the
    rest without waiting (`take_more`) and splits the table into that many parts.
    """

    def __init__(self, url: str, size: int):
        self.size = size
        self.free = size
        self.changed = asyncio.Condition()
        self.pool = asyncpg.create_pool(
            **asyncpg_connect_kwargs(url), min_size=0, max_size=size,
            max_inactive_connection_lifetime=IDLE_SECONDS, reset=_keep_session)

    async def take(self) -> None:
        async with self.changed:
            await self.changed.wait_for(lambda: self.free > 0)
            self.free -= 1

    def take_more(self, wanted: int) -> int:
        count = max(0, min(wanted, self.free))
        self.free -= count
        return count

    async def give_back(self, count: int) -> None:
        async with self.changed:
            self.free += count
            self.changed.notify_all()

    async def acquire(self):
        try:
            return await self.pool.acquire()
        except _CONNECTION_ERRORS as exc:
            raise errors.DatabaseUnavailable(f"cannot connect to the database: {exc}") from exc


class _Runner:
    """The event loop thread of this process and its pools (one per URL)."""

    def __init__(self):
        self.pid = os.getpid()
        self.loop = asyncio.new_event_loop()
        self.pools: dict[str, _Pool] = {}
        self.thread = threading.Thread(target=self.loop.run_forever, name="jobrunner-aggregate",
                                       daemon=True)
        self.thread.start()

    async def pool(self, url: str) -> _Pool:
        pool = self.pools.get(url)
        if pool is None:
            pool = self.pools[url] = _Pool(url, POOL_SIZE)
            await pool.pool             # min_size 0: opens no connection yet
        return pool

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    async def _close(self) -> None:
        await asyncio.gather(*(p.pool.close() for p in self.pools.values()),
                             return_exceptions=True)

    def close(self) -> None:
        try:
            asyncio.run_coroutine_threadsafe(asyncio.wait_for(self._close(), 5), self.loop).result(6)
        except Exception:  # noqa: BLE001 - best effort at exit
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)


_runner: _Runner | None = None
_runner_lock = threading.Lock()
_inherited: list[_Runner] = []          # a parent's runner, never touched in a child


def _get_runner() -> _Runner:
    global _runner
    runner = _runner
    if runner is not None and runner.pid == os.getpid():
        return runner
    with _runner_lock:
        if _runner is None or _runner.pid != os.getpid():
            if _runner is not None:
                # forked: the loop thread does not exist here and the sockets are the
                # parent's; keep the objects alive so nothing closes them from here
                _inherited.append(_runner)
            _runner = _Runner()
        return _runner


@atexit.register
def _close_at_exit() -> None:
    runner = _runner
    if runner is not None and runner.pid == os.getpid():
        runner.close()


async def _first_statement(reused: bool, statement):
    """Await `statement()`, the call's first statement on its connection. On one that
    came idle from the pool, a failure other than an SQL error (a connection error, or
    asyncpg's protocol finding the server's goodbye message unread) means the
    connection died meanwhile."""
    try:
        return await statement()
    except Exception as exc:
        if reused and (isinstance(exc, _CONNECTION_ERRORS)
                       or not isinstance(exc, asyncpg.PostgresError)):
            raise _StaleConnection() from exc
        raise


async def _begin(conn, reused: bool):
    """Start a read-only REPEATABLE READ transaction on `conn` (see _first_statement)."""
    tx = conn.transaction(isolation="repeatable_read", readonly=True)
    await _first_statement(reused, tx.start)
    return tx


async def _in_transaction(tx, work):
    try:
        result = await work
    except BaseException:
        try:
            await tx.rollback()
        except Exception:  # noqa: BLE001 - the connection is broken; released below
            pass
        raise
    await tx.commit()
    return result


async def _gather_or_cancel(*coros):
    """gather(), but on the first error cancel the others and wait for them, so no
    connection is released while still in use."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def _payments_once(pool: _Pool, parallelism: int, batch_rows: int,
                         min_blocks: int) -> tuple[np.ndarray, np.ndarray]:
    q = queries("report")
    acc = _Accumulator()
    taken = 0
    held: list = []
    try:
        await pool.take()
        taken = 1
        first = await pool.acquire()
        held.append(first)
        nblocks = await _first_statement(_was_used(first),
                                         lambda: first.fetchval(q["payments_blocks"]))
        if parallelism <= 1 or len(split_blocks(nblocks, parallelism, min_blocks)) == 1:
            # One part: one COPY statement, in autocommit, reads one snapshot and locks
            # the table for its duration by itself; no transaction, lock or exported
            # snapshot to set up (most of a small report's cost).
            await _copy_part(first, q["payments_rows"], acc, batch_rows)
            return acc.result()
        tx = await _begin(first, False)

        async def read_parts():
            nonlocal taken
            # Lock first (no snapshot yet), so nothing rewrites the table (VACUUM FULL,
            # TRUNCATE) while the parts are read; then snapshot and size together.
            await first.execute(q["payments_lock"])
            snapshot, nblocks = await first.fetchrow(q["payments_snapshot"])
            wanted = len(split_blocks(nblocks, parallelism, min_blocks)) - 1
            extra = pool.take_more(wanted)
            taken += extra
            ranges = split_blocks(nblocks, 1 + extra, min_blocks)
            others = await asyncio.gather(*(pool.acquire() for _ in ranges[1:]),
                                          return_exceptions=True)
            held.extend(c for c in others if not isinstance(c, BaseException))
            for c in others:
                if isinstance(c, BaseException):
                    raise c
            import_snapshot = sql.SQL(q["payments_import_snapshot"]).format(
                snapshot=sql.Literal(snapshot)).as_string(None)

            async def part(conn, lo, hi):
                await conn.fetchrow(q["payments_set_range"], _ctid(lo), _ctid(hi))
                return await _copy_part(conn, q["payments_rows_range"], acc, batch_rows)

            async def imported_part(conn, lo, hi):
                other_tx = await _begin(conn, False)

                async def read():
                    await conn.execute(q["payments_part_lock"])
                    await conn.execute(import_snapshot)
                    return await part(conn, lo, hi)

                return await _in_transaction(other_tx, read())

            await _gather_or_cancel(part(first, *ranges[0]),
                                    *(imported_part(c, *r) for c, r in zip(others, ranges[1:])))

        await _in_transaction(tx, read_parts())
    finally:
        for conn in held:
            _mark_used(conn)
        # release rolls back a transaction still open (see _keep_session); a connection
        # that cannot be reset is closed by the pool
        await asyncio.gather(*(pool.pool.release(c) for c in held), return_exceptions=True)
        if taken:
            await pool.give_back(taken)
    return acc.result()


_used_connections: "weakref.WeakSet" = weakref.WeakSet()


def _was_used(proxy) -> bool:
    return proxy._con in _used_connections


def _mark_used(proxy) -> None:
    con = proxy._con
    if con is not None:
        _used_connections.add(con)


async def _payments(url: str, parallelism: int, batch_rows: int, min_blocks: int) -> tuple[np.ndarray, np.ndarray]:
    pool = await _get_runner().pool(url)
    for attempt in (1, 2):
        try:
            return await _payments_once(pool, parallelism, batch_rows, min_blocks)
        except _StaleConnection as exc:
            # the server restarted (or ended idle sessions) since the connection was
            # pooled: drop every idle connection of the pool and start over once
            await pool.pool.expire_connections()
            if attempt == 2:
                raise errors.DatabaseUnavailable(
                    f"lost the database connection: {exc.__cause__}") from exc.__cause__
        except asyncpg.exceptions.LockNotAvailableError as exc:
            # see payments_part_lock: the table is being truncated or rewritten right now
            raise errors.DatabaseUnavailable(
                "the orders table is being rewritten; try again shortly") from exc
        except (ConnectionError, asyncpg.exceptions.PostgresConnectionError,
                asyncpg.exceptions.OperatorInterventionError) as exc:
            # 08xxx connection failures; 57xxx admin/crash shutdown, cannot connect now
            await pool.pool.expire_connections()
            raise errors.DatabaseUnavailable(f"lost the database connection: {exc}") from exc
        except asyncpg.exceptions.InterfaceError as exc:
            if "closed" not in str(exc):
                raise
            await pool.pool.expire_connections()
            raise errors.DatabaseUnavailable(f"lost the database connection: {exc}") from exc
    raise AssertionError("unreachable")


def payment_arrays(url: str, *, parallelism: int | None = None, batch_rows: int = BATCH_ROWS,
                   min_part_blocks: int = MIN_PART_BLOCKS) -> tuple[np.ndarray, np.ndarray]:
    """(user_ids, total_payments) as int64 arrays sorted by user id.

    `parallelism` is the most connections used (default: default_parallelism()), at
    most POOL_SIZE; a part gets at least `min_part_blocks` table blocks. Runs on the
    process's aggregation loop thread; safe to call from any thread (not from that
    loop itself).
    """
    parallelism = min(POOL_SIZE, parallelism or default_parallelism())
    return _get_runner().run(_payments(url, parallelism, batch_rows, min_part_blocks))


def payments(url: str, *, parallelism: int | None = None, min_part_blocks: int = MIN_PART_BLOCKS) -> list[dict]:
    """`[{"user_id": ..., "total_payment": ...}, ...]` sorted by user_id.

    Synchronous; runs on the process's aggregation loop thread, so it is safe to call
    from any thread (`await asyncio.to_thread(payments, url)`).
    """
    keys, sums = payment_arrays(url, parallelism=parallelism, min_part_blocks=min_part_blocks)
    return [{"user_id": k, "total_payment": s} for k, s in zip(keys.tolist(), sums.tolist())]
