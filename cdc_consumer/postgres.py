"""Connections to the source PostgreSQL, every one with the text of a row pinned.

pgoutput and `::text` print values in the session's DateStyle, TimeZone, IntervalStyle and
extra_float_digits, which a database or role may set (`ALTER DATABASE … SET datestyle = 'SQL,
DMY'`): the same instant would then reach ClickHouse as `04/11/2026 22:04:05 EST`, which its
parser misreads or refuses. PostgreSQL's own logical-replication worker pins these for the
same reason. Startup options outrank database and role defaults, and the walsender takes them
like any backend.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

ROW_TEXT_SETTINGS = {
    "DateStyle": "ISO",
    "TimeZone": "UTC",
    "IntervalStyle": "postgres",
    "extra_float_digits": "3",
}


def session_options(url: str, **settings: str) -> str:
    """The `options` startup parameter: the URL's own, then the row-text pins and `settings`
    (later ones win)."""
    own = conninfo_to_dict(url).get("options")
    pins = [
        f"-c {name}={_escaped(value)}" for name, value in {**ROW_TEXT_SETTINGS, **settings}.items()
    ]
    return " ".join([str(own), *pins] if own else pins)


def _escaped(value: str) -> str:
    """libpq splits options at spaces unless a backslash escapes them."""
    return value.replace("\\", "\\\\").replace(" ", "\\ ")


# Unless the URL says otherwise: a server that drops packets would hold a connect for psycopg's
# default of 130 s, past a stop's grace (CDC_SHUTDOWN_GRACE_SECONDS, 30 s by default).
CONNECT_TIMEOUT_SECONDS = 10


def first_line(exc: BaseException) -> str:
    """A psycopg error's first line (its message without the DETAIL/HINT lines), or its type."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def connect(
    url: str, *, settings: dict[str, str] | None = None, **kwargs: Any
) -> psycopg.Connection[Any]:
    """psycopg.connect with the row-text settings (and `settings`) pinned for the session, and
    a connect timeout unless the URL sets one."""
    if "connect_timeout" not in conninfo_to_dict(url):
        kwargs.setdefault("connect_timeout", CONNECT_TIMEOUT_SECONDS)
    return psycopg.connect(url, options=session_options(url, **(settings or {})), **kwargs)
