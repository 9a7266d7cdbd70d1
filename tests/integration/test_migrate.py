import threading

import psycopg

from jobrunner import migrate


def _versions(url):
    with psycopg.connect(url) as conn:
        return [r[0] for r in conn.execute("SELECT version FROM schema_migrations ORDER BY version")]


def test_migrate_applies_all_then_nothing(new_database):
    url = new_database(migrated=False)
    applied = migrate.migrate(url)
    assert [m.version for m in applied] == [m.version for m in migrate.available()]
    assert _versions(url) == [m.version for m in migrate.available()]
    assert migrate.migrate(url) == []
    with psycopg.connect(url) as conn:
        assert migrate.pending(conn) == []
        assert conn.execute("SELECT to_regclass('orders') IS NOT NULL").fetchone()[0]


def test_concurrent_migrators_apply_each_migration_once(new_database):
    url = new_database(migrated=False)
    results, errors = [], []
    barrier = threading.Barrier(4)

    def run():
        try:
            barrier.wait()
            results.append(migrate.migrate(url))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    applied = [m.version for batch in results for m in batch]
    assert sorted(applied) == [m.version for m in migrate.available()]
    assert _versions(url) == [m.version for m in migrate.available()]


def test_failed_migration_rolls_back_and_records_nothing(new_database, tmp_path, monkeypatch):
    url = new_database(migrated=False)
    good = tmp_path / "001_good.sql"
    good.write_text("CREATE TABLE good (id int);")
    bad = tmp_path / "002_bad.sql"
    bad.write_text("CREATE TABLE half (id int); SELECT no_such_function();")
    monkeypatch.setattr(migrate.config, "SQL_DIR", tmp_path)
    try:
        migrate.migrate(url)
    except psycopg.Error:
        pass
    else:
        raise AssertionError("the bad migration should have raised")
    with psycopg.connect(url) as conn:
        assert _versions(url) == [1]
        assert conn.execute("SELECT to_regclass('half')").fetchone()[0] is None
