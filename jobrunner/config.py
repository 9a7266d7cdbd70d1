"""Settings read from the environment, in one place.

Every variable is documented in README.md (Configuration).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SQL_DIR = ROOT / "sql"


def env_str(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def env_float(name: str, default: float) -> float:
    value = env_str(name)
    return float(value) if value is not None else default


def env_int(name: str, default: int) -> int:
    value = env_str(name)
    return int(value) if value is not None else default


def pgdata_dir() -> Path:
    """Where the embedded server keeps its data (never under a private home)."""
    return Path(env_str("PGDATA_DIR") or Path(tempfile.gettempdir()) / "jobrunner-pgdata")
