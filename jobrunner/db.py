"""Which database, and plain connections to it."""
from __future__ import annotations

import os

import psycopg
from psycopg.conninfo import conninfo_to_dict

from . import config


def database_url() -> str:
    """DATABASE_URL always wins; otherwise the embedded server (started if needed).

    The embedded URL is exported into os.environ so child processes reuse it.
    """
    url = config.env_str("DATABASE_URL")
    if url:
        return url
    from . import embedded

    url = embedded.start()
    os.environ["DATABASE_URL"] = url
    return url


def connect(url: str | None = None, **kwargs) -> psycopg.Connection:
    return psycopg.connect(url or database_url(), **kwargs)


# libpq keywords that asyncpg.connect() takes under another name (or as is).
_ASYNCPG_NAMES = {"host": "host", "hostaddr": "host", "port": "port", "user": "user",
                  "password": "password", "dbname": "database", "passfile": "passfile",
                  "sslmode": "ssl", "connect_timeout": "timeout"}
_IGNORED = {"sslcompression", "gssencmode", "krbsrvname", "gsslib", "target_session_attrs",
            "keepalives", "keepalives_idle", "keepalives_interval", "keepalives_count",
            "tcp_user_timeout", "client_encoding", "fallback_application_name"}


def asyncpg_connect_kwargs(url: str | None = None) -> dict:
    """Keyword arguments for asyncpg.connect() from a libpq URL or `key=value` conninfo.

    asyncpg does not read conninfo strings, and the embedded server's URL names a
    unix-socket directory (`?host=/some/dir`). Lists (`host=a,b port=1,2`) become
    lists; `application_name` and `options=-c name=value` become server settings.
    Unsupported keywords raise ValueError rather than being silently dropped.
    """
    params = conninfo_to_dict(database_url() if url is None else url)
    kwargs: dict = {}
    settings: dict[str, str] = {}
    if params.get("hostaddr"):
        params["host"] = params.pop("hostaddr")
    for key, value in params.items():
        if value is None or value == "" or key in _IGNORED:
            continue
        if key == "application_name":
            settings["application_name"] = value
        elif key == "options":
            settings.update(_parse_options(value))
        elif key in ("host", "port"):
            items = [int(v) if key == "port" else v for v in str(value).split(",")]
            kwargs[key] = items[0] if len(items) == 1 else items
        elif key == "connect_timeout":
            kwargs["timeout"] = float(value)
        elif key in _ASYNCPG_NAMES:
            kwargs[_ASYNCPG_NAMES[key]] = value
        else:
            raise ValueError(f"connection parameter {key!r} is not supported for asyncpg")
    if settings:
        kwargs["server_settings"] = settings
    return kwargs


def _parse_options(options: str) -> dict[str, str]:
    """`-c a=b -c c=d` / `--a=b` (libpq `options`) -> {"a": "b", "c": "d"}."""
    result: dict[str, str] = {}
    words = options.split()
    i = 0
    while i < len(words):
        word = words[i]
        if word == "-c" and i + 1 < len(words):
            word, i = words[i + 1], i + 1
        elif word.startswith("-c"):
            word = word[2:]
        elif word.startswith("--"):
            word = word[2:]
        else:
            raise ValueError(f"unsupported connection option {word!r}")
        name, sep, value = word.partition("=")
        if not sep:
            raise ValueError(f"unsupported connection option {word!r}")
        result[name.replace("-", "_")] = value
        i += 1
    return result
