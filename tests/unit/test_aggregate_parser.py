"""The text COPY parser and the accumulator of the payments report, on hand-made bytes."""
from __future__ import annotations

import random
from collections import defaultdict

import numpy as np
import pytest

from jobrunner import errors
from jobrunner.aggregate import MAX_ROW_BYTES, TextCopyParser, _Accumulator, split_blocks

INT4_MAX = 2**31 - 1
# the smallest block the parser takes: blocks fill up mid-row again and again
SMALL_BLOCK = 2 * MAX_ROW_BYTES
BIG_BLOCK = 4096  # holds all of the small test streams


def stream(rows) -> bytes:
    """What `COPY (SELECT user_id, total FROM orders) TO STDOUT` sends."""
    return b"".join(b"%d\t%d\n" % row for row in rows)


def expected(rows) -> dict[int, int]:
    sums: dict[int, int] = defaultdict(int)
    for user_id, total in rows:
        sums[user_id] += total
    return dict(sums)


def parse(chunks, batch_rows: int = 1, block_bytes: int = BIG_BLOCK) -> tuple[dict[int, int], int]:
    acc = _Accumulator()
    parser = TextCopyParser(acc.add, batch_rows, block_bytes)
    for chunk in chunks:
        parser.feed(chunk)
    count = parser.close()
    keys, sums = acc.result()
    return dict(zip(keys.tolist(), sums.tolist())), count


# every field length from 1 to 10 digits, zeros, the int4 maximum
ROWS = [(1, 10), (2, 0), (1, 7), (INT4_MAX, INT4_MAX), (5, 3), (INT4_MAX, INT4_MAX), (0, 1),
        (123456789, 99999999), (12, 345), (4567, 1000000000), (89012, 0), (345678, 2147483640),
        (9012345, 1), (12345678, 22), (0, 0)]


def test_whole_stream_in_one_chunk():
    assert parse([stream(ROWS)]) == (expected(ROWS), len(ROWS))


@pytest.mark.parametrize("block_bytes", [SMALL_BLOCK, SMALL_BLOCK + 7, BIG_BLOCK])
@pytest.mark.parametrize("batch_rows", [1, 3, 1000])
def test_split_into_two_chunks_at_every_offset(batch_rows, block_bytes):
    data = stream(ROWS)
    for cut in range(len(data) + 1):
        assert parse([data[:cut], data[cut:]], batch_rows, block_bytes) == (expected(ROWS), len(ROWS)), cut


@pytest.mark.parametrize("block_bytes", [SMALL_BLOCK, BIG_BLOCK])
@pytest.mark.parametrize("batch_rows", [1, 2, 1000])
def test_byte_by_byte(batch_rows, block_bytes):
    data = stream(ROWS)
    chunks = [data[i:i + 1] for i in range(len(data))]
    assert parse(chunks, batch_rows, block_bytes) == (expected(ROWS), len(ROWS))


def test_random_chunking_and_block_sizes():
    rnd = random.Random(7)
    rows = [(rnd.randint(0, INT4_MAX) if rnd.random() < 0.3 else rnd.randint(1, 50),
             rnd.choice([0, rnd.randint(0, 9), rnd.randint(0, INT4_MAX)])) for _ in range(3000)]
    data = stream(rows)
    for _ in range(20):
        cuts = sorted(rnd.sample(range(1, len(data)), 40))
        chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
        block = rnd.choice([SMALL_BLOCK, 61, 1000, BIG_BLOCK])
        assert parse(chunks, rnd.choice([1, 7, 100, 5000]), block) == (expected(rows), len(rows))


def test_many_rows_with_the_default_sizes():
    rnd = np.random.default_rng(5)
    users, totals = rnd.integers(0, 2**31, 200_000), rnd.integers(0, 2**31, 200_000)
    users[::3] %= 1000
    totals[::5] %= 100
    rows = list(zip(users.tolist(), totals.tolist()))
    data = stream(rows)
    chunks = [data[i:i + 100_000] for i in range(0, len(data), 100_000)]
    acc = _Accumulator()
    parser = TextCopyParser(acc.add)
    for chunk in chunks:
        parser.feed(chunk)
    assert parser.close() == len(rows)
    keys, sums = acc.result()
    assert dict(zip(keys.tolist(), sums.tolist())) == expected(rows)


def test_memoryview_and_bytearray_chunks():
    data = stream(ROWS)
    assert parse([memoryview(data)[:20], bytearray(data[20:40]), memoryview(data)[40:]]) == (
        expected(ROWS), len(ROWS))


def test_empty_stream():
    assert parse([]) == ({}, 0)
    assert parse([b"", b""]) == ({}, 0)


def test_zero_total_user_is_present():
    assert parse([stream([(3, 0), (4, 0), (4, 0)])]) == ({3: 0, 4: 0}, 3)


SIGNED = [(-1, 5), (3, 4), (-2147483648, 0), (-2147483648, 7), (-12345678901 // 10, 1), (7, 0),
          (-1, 2147483647), (0, 0)]


@pytest.mark.parametrize("block_bytes", [SMALL_BLOCK, BIG_BLOCK])
def test_negative_user_ids_anywhere(block_bytes):
    """user_id has no CHECK: negative ids down to the int4 minimum are valid data."""
    rows = SIGNED + ROWS
    data = stream(rows)
    for cut in range(len(data) + 1):
        assert parse([data[:cut], data[cut:]], 3, block_bytes) == (expected(rows), len(rows)), cut


@pytest.mark.parametrize("data, message", [
    (b"1\t2", "cut short"),                          # no line end
    (b"1\t2\n3", "cut short"),
    (b"1\t2\n3\t", "cut short"),
    (b"1\t2\t3\n", "unexpected bytes"),              # three columns
    (b"1\n", "cut short"),                           # one column
    (b"1\n2\n", "unexpected bytes"),
    (b"\\N\t1\n", "unexpected bytes"),               # NULL
    (b"1\t\\N\n", "unexpected bytes"),
    (b"1\t\n", "empty field"),
    (b"\t1\n", "empty field"),
    (b"\t\n" * 100, "empty field"),
    (b"1\t2\n\n", "cut short"),
    (b"2147483648\t1\n", "int4 range"),              # beyond int4 (a bigint column)
    (b"1\t9999999999\n", "int4 range"),
    (b"12345678901\t1\n", "int4 range"),
    (b"-2147483649\t1\n", "int4 range"),
    (b"1\t1.5\n", "unexpected bytes"),               # numeric
    (b"1\t1e3\n", "unexpected bytes"),
    (b"1 \t2\n", "unexpected bytes"),
    (b"1\t2\r\n", "unexpected bytes"),
    (b"1-2\t3\n", "unexpected bytes"),               # a minus sign inside a field
    (b"-\t3\n", "unexpected bytes"),
    (b"1\t-\n", "unexpected bytes"),
    (b"--1\t3\n", "unexpected bytes"),
    (b"\xff\t1\n", "unexpected bytes"),
    (b"1" * 100, "row too long|cut short"),          # no row ends: never buffered without bound
    (b"1\t2\n" + b"3" * 100 + b"\n", "int4 range|row too long|incomplete"),
])
@pytest.mark.parametrize("block_bytes", [SMALL_BLOCK, BIG_BLOCK])
def test_malformed_streams_raise(data, message, block_bytes):
    with pytest.raises(errors.ReportDataError, match=message):
        parse([data], 1, block_bytes)


@pytest.mark.parametrize("bad", [b"x", b"\\N", b"-", b" ", b"\t", b"\n", b"\x00", b"."])
def test_a_bad_byte_anywhere_raises_wherever_the_chunks_split(bad):
    """One bad byte placed before, inside or after every field of valid data."""
    data = stream(ROWS[:6])
    for at in range(len(data)):
        broken = data[:at] + bad + data[at:]
        if broken == data or (bad == b"-" and broken[at - 1:at] in (b"", b"\t", b"\n")):
            continue  # a minus sign at the start of a field is valid
        for cut in range(0, len(broken) + 1, 5):
            with pytest.raises(errors.ReportDataError):
                parse([broken[:cut], broken[cut:]], 2, SMALL_BLOCK)


def test_a_long_run_of_digits_is_refused_without_buffering_it():
    parser = TextCopyParser(lambda users, totals: None, 1, SMALL_BLOCK)
    with pytest.raises(errors.ReportDataError, match="row too long"):
        for _ in range(100):
            parser.feed(b"1234567")


def test_accumulator_dense_sparse_and_mixed_agree_with_python():
    rnd = np.random.default_rng(3)
    batches = [
        (rnd.integers(1, 1000, 5000), rnd.integers(0, 2**31, 5000)),           # dense from 0
        (rnd.integers(2**31 - 10, 2**31, 300), rnd.integers(0, 2**31, 300)),   # far away: sparse
        (rnd.integers(0, 2**31, 4000), rnd.integers(0, 100, 4000)),            # spread: sparse
        (rnd.integers(1, 1000, 5000), rnd.integers(0, 3, 5000)),               # dense again
    ]
    acc = _Accumulator()
    want: dict[int, int] = defaultdict(int)
    for users, totals in batches:
        acc.add(users.astype(np.intp), totals.astype(np.int64))
        for u, t in zip(users.tolist(), totals.tolist()):
            want[u] += t
    keys, sums = acc.result()
    assert keys.tolist() == sorted(want)
    assert sums.tolist() == [want[k] for k in sorted(want)]


def test_accumulator_window_starting_high():
    acc = _Accumulator()
    base = 2**31 - 100
    acc.add(np.array([base + 5, base, base + 5], np.intp), np.array([1, 0, 2**31 - 1], np.int64))
    acc.add(np.array([base + 99], np.intp), np.array([4], np.int64))
    acc.add(np.array([3], np.intp), np.array([0], np.int64))  # below the window: sparse
    keys, sums = acc.result()
    assert keys.tolist() == [3, base, base + 5, base + 99]
    assert sums.tolist() == [0, 0, 2**31, 4]


def test_sums_beyond_2_pow_53_are_exact():
    """One user with 2**23 orders of up to 2**31-1: a float64 running sum would lose
    the low bits past 2**53; the batched bincount plus int64 accumulation does not."""
    n = 1 << 23
    totals = np.full(n, 2**31 - 1, np.int64)
    totals[-1] = 2**31 - 2
    totals[n // 2] = 12345
    want = (n - 2) * (2**31 - 1) + 2**31 - 2 + 12345
    assert want > 2**53
    for users in (np.zeros(n, np.intp), np.full(n, 2**31 - 1, np.intp)):
        acc = _Accumulator()
        acc.add(users, totals)
        keys, sums = acc.result()
        assert sums.tolist() == [want]
        assert keys.tolist() == [int(users[0])]


def test_sparse_path_sums_beyond_2_pow_53_are_exact():
    acc = _Accumulator()
    acc.add(np.array([0], np.intp), np.array([1], np.int64))  # window at 0
    big = np.full(1 << 12, 2**31 - 1, np.int64)
    for _ in range(1 << 11):  # 2**23 orders for an id outside the window: the sort path
        acc.add(np.full(len(big), 2**31 - 1, np.intp), big)
    acc.add(np.array([2**31 - 1], np.intp), np.array([1], np.int64))
    keys, sums = acc.result()
    assert keys.tolist() == [0, 2**31 - 1]
    assert sums.tolist() == [1, (1 << 23) * (2**31 - 1) + 1]


@pytest.mark.parametrize("nblocks", [0, 1, 2, 3, 7, 100, 63728])
@pytest.mark.parametrize("parts", [1, 2, 3, 4, 16])
def test_split_blocks_covers_everything_once(nblocks, parts):
    ranges = split_blocks(nblocks, parts)
    assert 1 <= len(ranges) <= max(1, min(parts, nblocks))
    assert ranges[0][0] == 0 and ranges[-1][1] is None
    for (lo, hi), (next_lo, _) in zip(ranges, ranges[1:]):
        assert lo < hi == next_lo


@pytest.mark.parametrize("nblocks, parts, min_blocks, expected", [
    (0, 4, 512, 1), (511, 4, 512, 1), (1024, 4, 512, 2), (100_000, 4, 512, 4), (5, 4, 1, 4)])
def test_split_blocks_keeps_parts_at_least_min_blocks(nblocks, parts, min_blocks, expected):
    ranges = split_blocks(nblocks, parts, min_blocks)
    assert len(ranges) == expected
    assert ranges[0][0] == 0 and ranges[-1][1] is None
