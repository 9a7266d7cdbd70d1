"""The binary COPY parser and the accumulator of the payments report, on hand-made bytes."""
from __future__ import annotations

import random
import struct
from collections import defaultdict

import numpy as np
import pytest

from jobrunner import aggregate, errors
from jobrunner.aggregate import BinaryCopyParser, _Accumulator, split_blocks


def header(extension: bytes = b"") -> bytes:
    return aggregate.SIGNATURE + struct.pack(">iI", 0, len(extension)) + extension


def row(user_id: int, total: int) -> bytes:
    return struct.pack(">hiiii", 2, 4, user_id, 4, total)


def stream(rows, extension: bytes = b"") -> bytes:
    return header(extension) + b"".join(row(u, t) for u, t in rows) + b"\xff\xff"


def expected(rows) -> dict[int, int]:
    sums: dict[int, int] = defaultdict(int)
    for user_id, total in rows:
        sums[user_id] += total
    return dict(sums)


def parse(chunks, batch_rows: int = 1) -> tuple[dict[int, int], int]:
    acc = _Accumulator()
    parser = BinaryCopyParser(acc.add, batch_rows)
    for chunk in chunks:
        parser.feed(chunk)
    count = parser.close()
    keys, sums = acc.result()
    return dict(zip(keys.tolist(), sums.tolist())), count


ROWS = [(1, 10), (2, 0), (1, 7), (2**31 - 1, 2**31 - 1), (5, 3), (2**31 - 1, 2**31 - 1), (0, 1)]


def test_whole_stream_in_one_chunk():
    assert parse([stream(ROWS)]) == (expected(ROWS), len(ROWS))


@pytest.mark.parametrize("batch_rows", [1, 2, 3, 1000])
def test_split_into_two_chunks_at_every_offset(batch_rows):
    data = stream(ROWS)
    for cut in range(len(data) + 1):
        assert parse([data[:cut], data[cut:]], batch_rows) == (expected(ROWS), len(ROWS)), cut


@pytest.mark.parametrize("batch_rows", [1, 2, 1000])
def test_byte_by_byte(batch_rows):
    data = stream(ROWS)
    assert parse([data[i:i + 1] for i in range(len(data))], batch_rows) == (expected(ROWS), len(ROWS))


def test_random_chunking_and_header_extension():
    rnd = random.Random(7)
    rows = [(rnd.randint(0, 2**31 - 1) if rnd.random() < 0.3 else rnd.randint(1, 50),
             rnd.randint(0, 2**31 - 1)) for _ in range(3000)]
    data = stream(rows, extension=b"\x01\x02\x03")
    for _ in range(20):
        cuts = sorted(rnd.sample(range(1, len(data)), 40))
        chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
        assert parse(chunks, rnd.choice([1, 7, 100, 5000])) == (expected(rows), len(rows))


def test_memoryview_chunks():
    data = stream(ROWS)
    assert parse([memoryview(data)[:20], memoryview(data)[20:]]) == (expected(ROWS), len(ROWS))


def test_empty_stream():
    assert parse([stream([])]) == ({}, 0)


def test_zero_total_user_is_present():
    assert parse([stream([(3, 0), (4, 0), (4, 0)])]) == ({3: 0, 4: 0}, 3)


@pytest.mark.parametrize("data, message", [
    (b"COPY\n" + b"\x00" * 30, "not a binary COPY"),
    (header() + struct.pack(">hiiii", 3, 4, 1, 4, 1) + b"\xff\xff", "row layout"),
    (header() + struct.pack(">hiqi", 2, 8, 1, 4) + b"\x00" * 4 + b"\xff\xff", "row layout"),
    (header() + struct.pack(">hiiii", 2, -1, 0, 0, 0) + b"\xff\xff", "row layout"),
    (header() + row(1, 1), "cut short"),
    (header() + row(1, 1)[:-3], "cut short"),
    (header()[:10], "cut short"),
    (stream([(1, 1)]) + b"\x00", "after the end"),
])
def test_malformed_streams_raise(data, message):
    with pytest.raises(errors.ReportDataError, match=message):
        parse([data])


def test_data_after_trailer_in_a_later_chunk_raises():
    with pytest.raises(errors.ReportDataError, match="after the end"):
        parse([stream([(1, 1)]), row(2, 2)])


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


def test_extra_bytes_after_the_trailer_raise_wherever_the_chunks_split():
    data = stream(ROWS) + b"\x00"
    for cut in range(len(data) + 1):
        with pytest.raises(errors.ReportDataError, match="after the end"):
            parse([data[:cut], data[cut:]])


def test_stream_cut_anywhere_raises():
    data = stream(ROWS)
    for cut in range(len(data) - 1):
        with pytest.raises(errors.ReportDataError):
            parse([data[:cut]])


def null_row(total: int) -> bytes:  # user_id NULL: length -1 and no value, 14 bytes
    return struct.pack(">hiii", 2, -1, 4, total)


@pytest.mark.parametrize("nulls", [1, 2, 8, 9, 18])
def test_null_values_never_pass_unnoticed(nulls):
    """A NULL shortens its row by 4 bytes: the framing breaks (error), or, after a
    multiple of 9 NULLs, realigns with fewer rows than the server sent (the count
    check of _copy_part)."""
    rows = [(u, u * 10) for u in range(1, 40)]
    data = header() + b"".join(row(*r) for r in rows[:20]) + null_row(5) * nulls \
        + b"".join(row(*r) for r in rows[20:]) + b"\xff\xff"
    sent = len(rows) + nulls
    for cut in range(0, len(data), 7):
        try:
            _, parsed = parse([data[:cut], data[cut:]], 16)
        except errors.ReportDataError:
            continue
        assert parsed != sent
