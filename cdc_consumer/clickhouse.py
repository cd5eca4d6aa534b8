"""ClickHouse transports: the same SQL, bytes and settings through one of two connections.

- `HttpTransport`: clickhouse-connect over HTTP(S), for production (`CLICKHOUSE_URL=http://…`).
- `ChdbTransport`: the same engine in process through chDB (`CLICKHOUSE_URL=chdb:///path`), for
  the embedded demo.
Both send the same bytes with the same SQL and settings, so what the tests prove about one
holds for the other. What to insert and with which guarantees is the sink's business
(`clickhouse_sink.py`); this module only carries queries and classifies their failures.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

import orjson

from cdc_consumer.clickhouse_cluster import (
    InsertQuorum,
    quorum_insert_settings,
    quorum_select_settings,
)
from cdc_consumer.errors import ErrorKind, PipelineError

# ClickHouse error codes that mean "this data cannot go into this table", as opposed to the
# server or the network failing: parsing, type and size errors, and TOO_DEEP_RECURSION (306),
# which one row's nesting causes, not the batch's size.
_DATA_ERROR_CODES = frozenset({6, 26, 27, 32, 38, 41, 53, 69, 70, 72, 117, 131, 306, 349, 376})
# Codes that mean "this insert is too big", when the message says so: the same codes also
# report the whole server short of memory ("(total)", "User memory limit") or merges falling
# behind inserts ("Too many parts"), which retrying the same batch rides out and halving
# would only make worse.
_TOO_LARGE_WHEN = {
    229: ("Query is too large",),  # QUERY_IS_TOO_LARGE: over max_query_size
    241: ("Query memory limit", "Memory limit (for query)"),  # MEMORY_LIMIT_EXCEEDED, 26.x, older
    252: ("partitions for single INSERT block",),  # TOO_MANY_PARTS: max_partitions_per_insert_block
}
# A proxy in front of ClickHouse refusing the body (nginx's client_max_body_size) sends no
# ClickHouse code; clickhouse-connect reports the bare status.
_PROXY_TOO_LARGE = re.compile(r"\bHTTP status 413\b")
_ERROR_CODE = re.compile(r"Code: (\d+)")
_QUERY_WAS_CANCELLED = 394  # KILL QUERY: a newer run's fence
_THROW_IF = 395  # FUNCTION_THROW_IF_VALUE_IS_NON_ZERO: with our mark, an insert guard refused
SUPERSEDED_MARK = "superseded by a newer run of source"
# Integers come back as JSON numbers, so both transports return the same Python values. A
# profile's query cache would serve an old answer to the restart read or the epoch claim, and
# NULL for an empty max() would break the claim's arithmetic: both pinned off.
SELECT_SETTINGS: dict[str, str] = {
    "output_format_json_quote_64bit_integers": "0",
    "use_query_cache": "0",
    "aggregate_functions_null_for_empty": "0",
}


class ClickHouseTransport(Protocol):
    """What the consumer needs from a ClickHouse connection."""

    def command(self, sql: str) -> None: ...

    def select(self, sql: str, settings: Mapping[str, str] | None = None) -> list[list[Any]]: ...

    def insert(
        self,
        table: str,
        rows: Sequence[bytes],
        *,
        columns: Sequence[str],
        query_id: str,
        settings: Mapping[str, str],
        guard: str | None = None,
    ) -> None:
        """JSONEachRow `rows` (one line each) into `columns` of `table`, sent as one body of
        the rows joined by newlines. With a `guard` (a boolean SQL expression), the server
        evaluates it as the insert starts and writes nothing if it is false or raises: a fence
        that holds against a client frozen mid-flight."""

    def close(self) -> None: ...


class HttpTransport:
    """clickhouse-connect over HTTP(S); errors surface as transient sink failures."""

    def __init__(self, url: str, *, insert_quorum: InsertQuorum = 0) -> None:
        import clickhouse_connect  # noqa: PLC0415  (keeps chdb-only processes lean)

        # The read timeout stays clickhouse-connect's (send_receive_timeout, 300 s), longer
        # than CDC_SHUTDOWN_GRACE_SECONDS, and a stop does not depend on it: requests run on
        # daemon threads (the sink worker, the restart-read helper) that a stop stops waiting
        # for at its deadline, leaving what is in flight to the slot and to the next run's
        # fence and restart read. A timeout as short as the grace would instead cut healthy
        # long requests into retries: a large insert on a loaded server, a fence's KILL ...
        # SYNC waiting for an insert, a restart read over a large event_log; and the client
        # keeps a long query alive with progress headers no more often than every 10 s.
        self._client = clickhouse_connect.get_client(dsn=url, autogenerate_session_id=False)
        self._types: dict[str, dict[str, str]] = {}  # table -> column -> type, for input()
        # On a cluster (docs/adr/0005-clickhouse-cluster.md); both empty on one server.
        self._quorum_insert = quorum_insert_settings(insert_quorum)
        self._quorum_select = quorum_select_settings(insert_quorum)

    def command(self, sql: str) -> None:
        with _sink_errors():
            self._client.command(sql)

    def select(self, sql: str, settings: Mapping[str, str] | None = None) -> list[list[Any]]:
        with _sink_errors():
            raw = self._client.raw_query(
                sql,
                settings={**SELECT_SETTINGS, **self._quorum_select, **(settings or {})},
                fmt="JSONCompact",
            )
        return list(orjson.loads(raw)["data"])

    def insert(
        self,
        table: str,
        rows: Sequence[bytes],
        *,
        columns: Sequence[str],
        query_id: str,
        settings: Mapping[str, str],
        guard: str | None = None,
    ) -> None:
        options = {**settings, **self._quorum_insert, "query_id": query_id}
        names = ", ".join(columns)
        if guard is None:
            statement = f"INSERT INTO {table} ({names}) FORMAT JSONEachRow"
        else:
            # INSERT ... SELECT FROM input(): the server streams the body through the SELECT,
            # whose WHERE holds the guard; input() needs the structure of what is sent, which
            # is the table's own types for these columns.
            types = self._column_types(table)
            structure = quote_string(", ".join(f"{name} {types[name]}" for name in columns))
            statement = (
                f"INSERT INTO {table} ({names}) SELECT {names} FROM input({structure})"
                f" WHERE {guard} FORMAT JSONEachRow"
            )
        # The statement heads the body and the data follows it, as ClickHouse's HTTP interface
        # reads a POST without a `query` parameter: one join makes the whole request, where
        # `command(sql, data=...)` would copy a 20 MB batch three more times (and decode it to
        # text to see whether the statement only reads). An empty table name is how
        # raw_insert sends bytes as they are, with no INSERT of its own in front.
        body = b"\n".join([statement.encode(), *rows])
        with _sink_errors():
            self._client.raw_insert("", insert_block=body, settings=options)

    def _column_types(self, table: str) -> dict[str, str]:
        if table not in self._types:
            rows = self.select(
                "SELECT name, type FROM system.columns"
                f" WHERE database = currentDatabase() AND table = {quote_string(table)}"
            )
            self._types[table] = {str(name): str(kind) for name, kind in rows}
        return self._types[table]

    def close(self) -> None:
        self._client.close()


class ChdbTransport:
    # chdb ships py.typed but no annotations, hence the no-untyped-call ignores below.
    """The ClickHouse engine in process: one data directory per process, one query at a time."""

    def __init__(self, path: str, database: str = "default") -> None:
        try:
            from chdb.session import Session  # noqa: PLC0415  (~260 MB: load only when asked)
        except ImportError as exc:
            raise PipelineError(
                ErrorKind.CONFIGURATION,
                "CLICKHOUSE_URL names the embedded engine (chdb://), which this installation"
                " does not include",
                hint="point CLICKHOUSE_URL at a ClickHouse server (http:// or https://), or"
                " install the embedded engines: `uv sync --group embedded` (make demo/test do)",
            ) from exc

        self._session = Session(path)  # type: ignore[no-untyped-call]
        self._lock = threading.Lock()
        if database != "default":
            self.command(f"CREATE DATABASE IF NOT EXISTS {database}")
            self.command(f"USE {database}")

    def _query(self, sql: str, fmt: str = "CSV") -> bytes:
        with self._lock, _sink_errors():
            return bytes(self._session.query(sql, fmt).bytes())  # type: ignore[no-untyped-call]

    def command(self, sql: str) -> None:
        self._query(sql)

    def select(self, sql: str, settings: Mapping[str, str] | None = None) -> list[list[Any]]:
        clause = _settings_clause({**SELECT_SETTINGS, **(settings or {})})
        raw = self._query(f"{sql} SETTINGS {clause}", "JSONCompact")
        return list(orjson.loads(raw)["data"]) if raw else []

    def insert(
        self,
        table: str,
        rows: Sequence[bytes],
        *,
        columns: Sequence[str],
        query_id: str,
        settings: Mapping[str, str],
        guard: str | None = None,
    ) -> None:
        # No query_id and no guard: an insert runs inside this process and cannot outlive it,
        # and the data directory is locked to one process, so no earlier run can be alive to
        # fence (see ClickHouseSink.fence_earlier_runs).
        del query_id, guard
        # Inline data is safe here: chDB ends it at a blank line, and encoded rows are one line
        # each (JSON escapes every newline inside them), joined by single newlines.
        head = (
            f"INSERT INTO {table} ({', '.join(columns)}) SETTINGS {_settings_clause(settings)}"
            " FORMAT JSONEachRow"
        )
        self._query(b"\n".join([head.encode(), *rows]).decode())
        # The engine frees an insert's working memory (hundreds of MB for a 50,000-row block
        # with the JSON column) to its allocator, which keeps it: in this process that is the
        # consumer's RSS. Handing it back after each insert bounds the peak to one insert's
        # worth (docs/benchmarks.md, "chDB's memory"), for ~30 ms an insert.
        self._query("SYSTEM JEMALLOC PURGE")

    def close(self) -> None:
        self._session.close()  # type: ignore[no-untyped-call]


def _settings_clause(settings: Mapping[str, str]) -> str:
    return ", ".join(f"{key} = {quote_string(value)}" for key, value in settings.items())


def quote_string(value: str) -> str:
    """A ClickHouse string literal (for names and identifiers we hold, never event data)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


@contextmanager
def _sink_errors() -> Iterator[None]:
    """Wrap a transport failure as the PipelineError `sink_failure` classifies it as."""
    try:
        yield
    except PipelineError:
        raise
    except Exception as exc:
        raise sink_failure(exc) from exc


def sink_failure(exc: Exception) -> PipelineError:
    """What a failed ClickHouse request means: rejected data is a poison event, an insert over
    a size limit is too large, anything else is transient."""
    detail = _first_line(exc)
    match = _ERROR_CODE.search(detail)
    code = int(match.group(1)) if match else None
    if code == _QUERY_WAS_CANCELLED or (code == _THROW_IF and SUPERSEDED_MARK in detail):
        return PipelineError(
            ErrorKind.SUPERSEDED,
            f"clickhouse refused the write: {detail}",
            hint="a newer run of this source took the slot over and fenced this one; this"
            " run abandons what it holds (the slot replays it) and stands by",
        )
    if code in _DATA_ERROR_CODES:
        return PipelineError(
            ErrorKind.POISON_EVENT,
            f"clickhouse rejected the data: {detail}",
            hint="the offending rows are isolated into event_log_dead_letter",
        )
    phrases = _TOO_LARGE_WHEN.get(code, ()) if code is not None else ()
    if any(phrase in detail for phrase in phrases) or (
        code is None and _PROXY_TOO_LARGE.search(detail)
    ):
        return PipelineError(
            ErrorKind.BATCH_TOO_LARGE,
            f"clickhouse refused an insert this large: {detail}",
            hint="the batch is halved until it fits; lower CDC_BATCH_MAX_BYTES (or raise the"
            " limit named here) so batches fit the first time",
        )
    return PipelineError(
        ErrorKind.TRANSIENT_SINK,
        f"clickhouse request failed: {type(exc).__name__}: {detail}",
        hint="check CLICKHOUSE_URL and that ClickHouse is up; the consumer retries",
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:500] if text else ""


def connect(url: str, *, insert_quorum: InsertQuorum = 0) -> ClickHouseTransport:
    """A transport for CLICKHOUSE_URL: http(s)://user:pass@host:port/db or chdb:///path."""
    parts = urlsplit(url)
    if parts.scheme == "chdb":
        database = parse_qs(parts.query).get("database", ["default"])[0]
        return ChdbTransport(parts.path, database)
    return HttpTransport(url, insert_quorum=insert_quorum)
