"""The payments report: total of the orders per user, summed in Python.

SQL only projects (`SELECT user_id, total FROM orders`, sql/queries/report.sql); the
sums happen here. Parsing rows one at a time in Python is far too slow for millions of
rows, so:

* the rows arrive as binary COPY, received in blocks by asyncpg (psycopg hands out
  one CopyData message, i.e. one row, per call);
* each row of the binary COPY stream is fixed-width (int16 field count, then length
  and value of user_id and of total: 18 bytes), so blocks are parsed in bulk with a
  numpy structured view; a partial row at the end of a block is carried over;
* per batch, user ids are counted with `np.bincount` (dense id span) or sorted and
  reduced (sparse ids), and added into int64 accumulators: sums never overflow and
  stay exact (see `_Accumulator`);
* the table is split into block (ctid) ranges read in parallel on several
  connections, all in one exported REPEATABLE READ snapshot, so the parts add up to
  one consistent picture of the table even while others write to it.

Memory is bounded by the batch size, the number of connections and the number of
distinct users, never by the number of rows.
"""
from __future__ import annotations

import asyncio
import os
import struct

import asyncpg
import numpy as np
from psycopg import sql

from . import config, errors
from .db import asyncpg_connect_kwargs
from .sqlfile import queries

SIGNATURE = b"PGCOPY\n\xff\r\n\x00"
HEADER_FIXED = len(SIGNATURE) + 8       # signature, int32 flags, int32 extension length
TRAILER = b"\xff\xff"                   # int16 -1
ROW = np.dtype([("nfields", ">i2"), ("len_user", ">i4"), ("user_id", ">i4"),
                ("len_total", ">i4"), ("total", ">i4")])
ROW_SIZE = ROW.itemsize                 # 18

BATCH_ROWS = 1 << 17                    # rows summed at a time (~2.4 MB of COPY data)
# float64 bincount weights are exact while every partial sum stays below 2**53; a batch
# holds at most 2**22 rows whose |total| < 2**31, so its sums stay below 2**53.
MAX_BATCH_ROWS = 1 << 22
DENSE_SPAN = 1 << 21                    # dense accumulator covers at most this many ids
MERGE_PAIRS = 1 << 20                   # fold sparse partial results beyond this many
MAX_PARTS = 16
MIN_PART_BLOCKS = 512                   # 4 MB of heap; smaller tables use fewer connections


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


class BinaryCopyParser:
    """Parse a binary COPY stream of (int4 NOT NULL, int4 NOT NULL) rows in bulk.

    `feed()` takes chunks of any size, split anywhere. The rows of each chunk are read
    in place through a numpy structured view (no copy of the chunk); a row split
    between chunks is completed from the next one. User ids (intp) and totals
    (float64, exact for int4) are gathered into `batch_rows`-long arrays handed to
    `sink(user_ids, totals)`; the arrays are reused, so the sink must not keep them.
    `close()` flushes and checks the stream ended with its trailer. Anything else
    (other column types, NULLs, a cut stream) raises errors.ReportDataError rather
    than producing wrong sums (the caller also compares the row count with the
    server's, see _copy_part).
    """

    def __init__(self, sink, batch_rows: int = BATCH_ROWS):
        self.sink = sink
        self.capacity = max(1, min(batch_rows, MAX_BATCH_ROWS))
        self.user_ids = np.empty(self.capacity, np.intp)
        self.totals = np.empty(self.capacity, np.float64)
        self.filled = 0
        self.head = b""                 # header bytes until the header is complete
        self.header_done = False
        self.rest = b""                 # start of a row split between chunks
        self.ended = False
        self.rows = 0

    def feed(self, chunk) -> None:
        if self.ended:
            if len(chunk):
                raise errors.ReportDataError("data after the end of the COPY stream")
            return
        if not self.header_done:
            chunk = self._header(chunk)
            if chunk is None:
                return
        pos, size = 0, len(chunk)
        if self.rest:
            take = min(size, ROW_SIZE - len(self.rest))
            self.rest += bytes(chunk[:take])
            pos = take
            if self._at_trailer(self.rest, size - pos):
                return
            if len(self.rest) < ROW_SIZE:
                return
            self._rows(np.frombuffer(self.rest, ROW))
            self.rest = b""
        count = (size - pos) // ROW_SIZE
        if count:
            self._rows(np.frombuffer(chunk, ROW, count=count, offset=pos))
            pos += count * ROW_SIZE
        if pos < size:
            self.rest = bytes(chunk[pos:])
            self._at_trailer(self.rest, 0)

    def close(self) -> int:
        """Flush; return the number of rows parsed."""
        self._flush()
        if not self.ended:
            raise errors.ReportDataError("COPY stream cut short")
        return self.rows

    def _header(self, chunk):
        """Collect the header; return what follows it, or None while incomplete."""
        self.head += bytes(chunk)
        if len(self.head) < HEADER_FIXED:
            return None
        if self.head[:len(SIGNATURE)] != SIGNATURE:
            raise errors.ReportDataError("not a binary COPY stream")
        flags, ext = struct.unpack_from(">iI", self.head, len(SIGNATURE))
        if flags & 0x10000:
            raise errors.ReportDataError("binary COPY with OIDs is not supported")
        if len(self.head) < HEADER_FIXED + ext:
            return None
        self.header_done = True
        body, self.head = self.head[HEADER_FIXED + ext:], b""
        return body

    def _at_trailer(self, rest: bytes, more: int) -> bool:
        """True once the trailer is seen (rows never start with it: their field count
        is 2); anything after it is an error."""
        if rest[:2] != TRAILER:
            return False
        if len(rest) > 2 or more:
            raise errors.ReportDataError("data after the end of the COPY stream")
        self.ended = True
        return True

    def _rows(self, rows: np.ndarray) -> None:
        # The first and last row of every piece are checked, not every row: the only
        # rows of another length a two-int4 projection can yield are NULLs (4 bytes
        # shorter), and any of those shifts the framing, which the trailer check and
        # the row count the server reports (see _copy_part) both catch.
        ends = rows[[0, -1]]
        if not ((ends["nfields"] == 2).all() and (ends["len_user"] == 4).all()
                and (ends["len_total"] == 4).all()):
            raise errors.ReportDataError(
                "unexpected row layout in COPY data (expected two int4 NOT NULL columns)")
        self.rows += len(rows)
        while len(rows):
            take = min(len(rows), self.capacity - self.filled)
            end = self.filled + take
            self.user_ids[self.filled:end] = rows["user_id"][:take]
            self.totals[self.filled:end] = rows["total"][:take]
            self.filled, rows = end, rows[take:]
            if self.filled == self.capacity:
                self._flush()

    def _flush(self) -> None:
        if self.filled:
            self.sink(self.user_ids[:self.filled], self.totals[:self.filled])
            self.filled = 0


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
    parser = BinaryCopyParser(acc.add, batch_rows)

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

    status = await conn.copy_from_query(query, output=output, format="binary")
    if failure:
        raise failure[0]
    rows = parser.close()
    expected = int(status.split()[-1])
    if rows != expected:
        raise errors.ReportDataError(f"parsed {rows} rows, server sent {expected}")
    return rows


async def _connect(kwargs: dict):
    try:
        return await asyncpg.connect(**kwargs)
    except (OSError, asyncio.TimeoutError, asyncpg.exceptions.CannotConnectNowError,
            asyncpg.exceptions.TooManyConnectionsError) as exc:
        raise errors.DatabaseUnavailable(f"cannot connect to the database: {exc}") from exc


async def _payments(url: str, parallelism: int, batch_rows: int, min_blocks: int) -> tuple[np.ndarray, np.ndarray]:
    q = queries("report")
    kwargs = asyncpg_connect_kwargs(url)
    acc = _Accumulator()
    first = await _connect(kwargs)
    others: list = []
    try:
        if parallelism <= 1:
            await _copy_part(first, q["payments_rows"], acc, batch_rows)
            return acc.result()
        async with first.transaction(isolation="repeatable_read", readonly=True):
            # Lock first (no snapshot yet), so nothing rewrites the table (VACUUM FULL,
            # TRUNCATE) while the parts are read; then snapshot and size together.
            await first.execute(q["payments_lock"])
            snapshot, nblocks = await first.fetchrow(q["payments_snapshot"])
            ranges = split_blocks(nblocks, parallelism, min_blocks)
            others = await asyncio.gather(*(_connect(kwargs) for _ in ranges[1:]))
            import_snapshot = sql.SQL(q["payments_import_snapshot"]).format(
                snapshot=sql.Literal(snapshot)).as_string(None)

            async def part(conn, lo, hi):
                await conn.fetchrow(q["payments_set_range"], _ctid(lo), _ctid(hi))
                return await _copy_part(conn, q["payments_rows_range"], acc, batch_rows)

            async def imported_part(conn, lo, hi):
                async with conn.transaction(isolation="repeatable_read", readonly=True):
                    await conn.execute(import_snapshot)
                    return await part(conn, lo, hi)

            await asyncio.gather(part(first, *ranges[0]),
                                 *(imported_part(c, *r) for c, r in zip(others, ranges[1:])))
    except (ConnectionError, asyncpg.exceptions.ConnectionDoesNotExistError,
            asyncpg.exceptions.CannotConnectNowError, asyncpg.exceptions.AdminShutdownError) as exc:
        raise errors.DatabaseUnavailable(f"lost the database connection: {exc}") from exc
    finally:
        await asyncio.gather(*(conn.close() for conn in [first, *others]), return_exceptions=True)
    return acc.result()


def payment_arrays(url: str, *, parallelism: int | None = None, batch_rows: int = BATCH_ROWS,
                   min_part_blocks: int = MIN_PART_BLOCKS) -> tuple[np.ndarray, np.ndarray]:
    """(user_ids, total_payments) as int64 arrays sorted by user id.

    `parallelism` is the most connections used (default: default_parallelism()); a
    part gets at least `min_part_blocks` table blocks.
    """
    return asyncio.run(_payments(url, parallelism or default_parallelism(), batch_rows,
                                 min_part_blocks))


def payments(url: str, *, parallelism: int | None = None, min_part_blocks: int = MIN_PART_BLOCKS) -> list[dict]:
    """`[{"user_id": ..., "total_payment": ...}, ...]` sorted by user_id.

    Synchronous; runs its own event loop, so it is safe to call from a thread
    (`await asyncio.to_thread(payments, url)`).
    """
    keys, sums = payment_arrays(url, parallelism=parallelism, min_part_blocks=min_part_blocks)
    return [{"user_id": k, "total_payment": s} for k, s in zip(keys.tolist(), sums.tolist())]
