import pytest

from jobrunner import sqlfile


def test_parse_named_blocks():
    text = "-- header comment\n-- name: one\nSELECT 1;\n\n-- name: two\n-- a comment\nSELECT 2\n"
    assert sqlfile.parse(text) == {"one": "SELECT 1", "two": "-- a comment\nSELECT 2"}


def test_duplicate_names_are_refused():
    with pytest.raises(ValueError, match="duplicate"):
        sqlfile.parse("-- name: a\nSELECT 1\n-- name: a\nSELECT 2\n")


def test_every_shipped_query_file_parses():
    from jobrunner import config

    files = sorted((config.SQL_DIR / "queries").glob("*.sql"))
    assert files
    for path in files:
        assert sqlfile.queries(path.stem), path.name
