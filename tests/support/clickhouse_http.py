"""ClickHouse's HTTP interface on 127.0.0.1, executing every query in chDB. Test support only.

This is not a product feature and is never shipped: it exists so the production transport
(clickhouse-connect over HTTP) runs against the real ClickHouse engine on machines without a
ClickHouse server. Run it in its own process (a process can open one chDB data path, and a data
path can be open in one process)::

    python -m tests.support.clickhouse_http --path DIR [--port N] [--user NAME:PASSWORD]

It prints ``listening 127.0.0.1:PORT`` on stdout once it accepts queries.

The design's rule: this server can never hide a wrong or ignored setting. Every URL parameter
that is not part of the HTTP protocol itself (``query``, ``database``, ``user``, ``query_id``,
``session_id``, ``param_*``, ...) is a ClickHouse setting, and it goes into the query's own
``SETTINGS`` clause, so chDB applies it or fails on it exactly as a real server would:

- ``INSERT INTO t [(cols)] SETTINGS k = 'v' FORMAT fmt <data>``: right after the table, where
  the grammar puts an INSERT's settings (the data is never changed; data holding a blank line
  is handed to chDB as ``FROM INFILE``, because chDB, like clickhouse-client reading a script,
  would end inline data there where a real server reads the whole body);
- any other statement: ``<statement> FORMAT fmt SETTINGS k = 'v'`` (the clause ClickHouse
  parses after any query with output, DDL included); ``DELETE``/``UPDATE`` take a bare
  ``SETTINGS`` clause;
- a statement whose grammar has no SETTINGS clause at all (``SET``, ``USE``, ``SYSTEM``,
  ``GRANT``...): the settings are first checked by chDB (``SELECT 1 FORMAT Null SETTINGS ...``),
  so an unknown setting or bad value still fails, then the statement runs; the server log says so.

Where it knowingly differs from a real server:

- one chDB session serves every request (queries are serialised; ``session_id`` is ignored, so a
  ``SET`` or temporary table is visible to every client) and there is one database user:
  ``--user`` only gates access (wrong credentials get code 516, HTTP 403);
- responses are buffered, never streamed; ``compress=1``/``decompress=1`` (ClickHouse's own
  block compression), multipart bodies (external data) and ``client_protocol_version`` are not
  implemented: the first two fail loudly, the last is ignored, so clickhouse-connect falls back
  to protocol version 0;
- failed queries answer HTTP 500 (403 for authentication), where a real server also uses 400/404
  for some codes;
- ``INSERT ... SELECT ... FROM input('structure') ... FORMAT fmt <data>`` reads the data from a
  file through ``file(path, fmt, 'structure')`` in the same SELECT (chDB has no request body to
  stream through ``input()``); the SELECT, its WHERE included, runs unchanged;
- chDB's setting defaults are chDB's (``date_time_input_format`` is ``best_effort`` and
  ``enable_http_compression`` is 1 here), so a test relying on a default must send it;
- ``system.processes`` inside chDB only ever shows the query asking, so the server keeps its
  own list of running queries by ``query_id`` and answers ``KILL QUERY WHERE <cond> [SYNC |
  ASYNC | TEST]`` itself: chDB evaluates ``<cond>`` over that list (only the ``query_id``
  column exists there), a matching INSERT still held by ``hold_inserts`` fails with code 394
  (QUERY_WAS_CANCELLED) as a real server cancels it, one already executing finishes, and
  ``SYNC`` (the default) answers once every match has ended. A second query reusing a running
  ``query_id`` gets code 216, as on a real server.

Responses are compressed when ``enable_http_compression`` is on and the client accepts it,
preferring gzip, deflate, zstd, lz4 in that order, as a real server does (br aside); request
bodies may be gzip, deflate, zstd, lz4 (concatenated frames) or br (with brotli installed).

Fault hooks live under ``/_test/``, a path ClickHouse never serves. They and the insert counters
act on data inserts (a FORMAT body), not on one-line ``INSERT ... VALUES`` statements (the
consumer's bookkeeping rows in cdc_sources and cdc_runs):

- ``hold_inserts``: INSERTs wait, before executing, until ``release_inserts``; with
  ``?stage=executing`` they wait as if executing, which KILL QUERY cannot cancel and SYNC
  waits for; with ``?after=N`` the next N INSERTs run and holding starts with the one after;
- ``fail_inserts?count=N[&code=C][&status=S][&message=M][&table=T]``: the next N INSERTs (into
  table T only, if given) fail without executing, with ClickHouse error C (default 1002) and
  message M under HTTP status S (default 500); ``code=0`` answers as a proxy in front of the
  server would (nginx's HTML page for status S, no ``X-ClickHouse-Exception-Code``), e.g.
  ``code=0&status=413`` for a proxy's body size limit;
- ``fail_inserts_over?bytes=N[&code=C][&status=S][&message=M][&table=T]``: until ``reset``,
  every INSERT whose request body (as sent, before any decompression) exceeds N bytes fails
  the same way; the one limit that smaller inserts fit under, as a proxy's body limit or a
  server's memory limit behaves;
- ``profile?name=value&...``: settings applied under every query's own until ``reset``, as a
  user profile's are on a real server (the query's settings win);
- ``lose_answers?count=N``: the next N data INSERTs execute, then answer with an error, as
  when the connection drops after the server committed (the client cannot tell them apart);
- ``drop_answers?count=N``: the next N data INSERTs execute, then the connection closes with
  no answer at all (what clickhouse-connect resends a request after, on its own);
- ``stats`` (JSON counters), ``wait_held?count=N&timeout=S`` (returns once N INSERTs are being
  held) and ``reset`` (counters zeroed, every fault cleared, held INSERTs released).
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import gzip
import hmac
import http
import importlib
import json
import re
import signal
import sys
import threading
import uuid
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import lz4.frame  # type: ignore[import-untyped]
from backports import zstd

DISPLAY_NAME = "chdb-http-test-server"
_UNKNOWN_EXCEPTION = 1002
_SYNTAX_ERROR = 62
_UNKNOWN_SETTING = 115
_AUTHENTICATION_FAILED = 516
_NOT_IMPLEMENTED = 48
_QUERY_WITH_SAME_ID_IS_ALREADY_RUNNING = 216
_QUERY_WAS_CANCELLED = 394
_NO_CLICKHOUSE_CODE = 0  # an injected failure answered by "a proxy", not by ClickHouse
_KILL_QUERY = re.compile(
    rb"^\s*KILL\s+QUERY\s+WHERE\s+(?P<where>.+?)(?:\s+(?P<mode>SYNC|ASYNC|TEST))?\s*;?\s*\Z",
    re.IGNORECASE | re.DOTALL,
)

# URL parameters the HTTP handler consumes itself; everything else is a setting (HTTPHandler.cpp).
_PROTOCOL_PARAMS = frozenset(
    {
        "query",
        "database",
        "default_format",
        "user",
        "password",
        "quota_key",
        "query_id",
        "stacktrace",
        "role",
        "buffer_size",
        "wait_end_of_query",
        "session_id",
        "session_timeout",
        "session_check",
        "client_protocol_version",
        "close_session",
        "compress",
        "decompress",
    }
)
_SETTING_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_LEADING_NOISE = re.compile(rb"(?:\s+|--[^\n]*(?:\n|\Z)|/\*.*?\*/)*", re.DOTALL)
_FIRST_WORD = re.compile(rb"[A-Za-z]+|\(")
_TRAILING_FORMAT = re.compile(rb"\bFORMAT\s+([A-Za-z0-9_]+)\s*\Z", re.IGNORECASE)
_SYNTAX_POSITION = re.compile(r"Syntax error[^:]*: failed at position (\d+)")
_ERROR_CODE = re.compile(r"Code: (\d+)\.")
_OUTPUT_STATEMENTS = frozenset(
    {"SELECT", "WITH", "FROM", "(", "SHOW", "DESCRIBE", "DESC", "EXISTS", "EXPLAIN", "CHECK"}
)
# Identifiers and balanced parentheses in an INSERT's head, which ends where SETTINGS goes.
_INSERT_INTO = re.compile(rb"INSERT\s+INTO\s+(?:TABLE\s+)?", re.IGNORECASE)
_IDENTIFIER = rb'(?:`(?:[^`\\]|\\.)*`|"(?:[^"\\]|\\.)*"|[A-Za-z_][A-Za-z0-9_$]*)'
_QUALIFIED_NAME = re.compile(_IDENTIFIER + rb"(?:\s*\.\s*" + _IDENTIFIER + rb")*")
_FUNCTION_NAME = re.compile(rb"FUNCTION\s+[A-Za-z_][A-Za-z0-9_]*\s*(?=\()", re.IGNORECASE)
_EXISTING_SETTINGS = re.compile(rb"\s+SETTINGS\s+", re.IGNORECASE)
# After the target: [SETTINGS ...] FORMAT fmt, then the data (ClickHouse skips blanks and one
# line break after the format name). A VALUES or SELECT insert has no FORMAT clause here.
_INLINE_FORMAT = re.compile(
    rb"(?P<settings>\s+SETTINGS\s(?:(?!\b(?:VALUES|SELECT|WITH)\b).)*?)?"
    rb"\s*\bFORMAT\s+(?P<fmt>[A-Za-z0-9_]+)[ \t\f]*\r?\n?",
    re.IGNORECASE | re.DOTALL,
)
# The real server's preference when Accept-Encoding lists several (br would come first).
_RESPONSE_ENCODINGS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": gzip.compress,
    "deflate": zlib.compress,
    "zstd": zstd.compress,
    "lz4": lz4.frame.compress,
}


class _AnswerDropped(Exception):  # noqa: N818  (a signal to the handler, not an error)
    """The drop_answers hook: the insert landed; close the connection without answering."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__("answer dropped")
        self.outcome = outcome


class ClickHouseError(Exception):
    """A failure reported the way ClickHouse reports it: code, message, HTTP status."""

    def __init__(self, code: int, text: str, status: int = 500) -> None:
        super().__init__(text)
        self.code = code
        self.text = text
        self.status = status

    @classmethod
    def of(cls, code: int, message: str, name: str, status: int = 500) -> ClickHouseError:
        return cls(code, f"Code: {code}. DB::Exception: {message}. ({name})", status)

    @classmethod
    def from_chdb(cls, exc: Exception) -> ClickHouseError:
        text = str(exc).strip()
        match = _ERROR_CODE.match(text)
        return cls(int(match.group(1)) if match else _UNKNOWN_EXCEPTION, text)

    @classmethod
    def from_proxy(cls, status: int) -> ClickHouseError:
        """What a reverse proxy answers when it refuses a request itself (nginx's page)."""
        title = f"{status} {http.HTTPStatus(status).phrase}"
        page = (
            f"<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n"
            f"<center><h1>{title}</h1></center>\r\n<hr><center>nginx</center>\r\n"
            "</body>\r\n</html>\r\n"
        )
        return cls(_NO_CLICKHOUSE_CODE, page, status)

    def syntax_error_from(self, offset: int) -> bool:
        """A syntax error at or after byte `offset`, i.e. in text this server appended."""
        match = _SYNTAX_POSITION.search(self.text)
        return self.code == _SYNTAX_ERROR and match is not None and int(match.group(1)) > offset


# --- SQL: where the settings go --------------------------------------------------------------


def statement_keyword(sql: bytes) -> str:
    """The statement's first keyword, upper case, after comments and whitespace."""
    start = _LEADING_NOISE.match(sql)
    match = _FIRST_WORD.match(sql, start.end() if start else 0)
    return match.group(0).decode().upper() if match else ""


def settings_clause(settings: dict[str, str]) -> bytes:
    """`k = 'v', ...`: values are string literals, parsed by each setting's type like URL ones."""
    pairs = []
    for name, value in settings.items():
        if not _SETTING_NAME.match(name):
            raise ClickHouseError.of(
                _UNKNOWN_SETTING, f"Unknown setting '{name}'", "UNKNOWN_SETTING"
            )
        literal = value.replace("\\", "\\\\").replace("'", "\\'")
        pairs.append(f"{name} = '{literal}'")
    return ", ".join(pairs).encode()


def insert_with_settings(sql: bytes, clause: bytes) -> bytes:
    """`INSERT INTO t [(cols)] SETTINGS <clause> <rest>`; inline data is left untouched."""
    pos = _insert_target_end(sql)
    existing = _EXISTING_SETTINGS.match(sql, pos)
    if existing:  # ours first, so the query's own SETTINGS win as they do on a real server
        return sql[: existing.end()] + clause + b", " + sql[existing.end() :]
    return sql[:pos] + b" SETTINGS " + clause + b" " + sql[pos:]


def insert_from_file(sql: bytes, path: Path) -> bytes | None:
    """`INSERT INTO t [(cols)] FROM INFILE 'path' [SETTINGS ...] FORMAT fmt`, the inline data
    written to `path`, when that data holds a blank line; None otherwise (run it as it is).

    chDB ends inline INSERT data at the first blank line, as clickhouse-client does in a
    script, where a real server reads the whole body: a Native or RowBinary block with the
    bytes 0A 0A in it (one single-row insert of a random UUID in about 4,000) would be cut.
    """
    pos = _insert_target_end(sql)
    clause = _INLINE_FORMAT.match(sql, pos)
    if clause is None or b"\n\n" not in sql[clause.end() :]:
        return None
    path.write_bytes(sql[clause.end() :])
    settings = clause.group("settings") or b""
    quoted = str(path).replace("\\", "\\\\").replace("'", "\\'").encode()
    return sql[:pos] + b" FROM INFILE '" + quoted + b"'" + settings + b" FORMAT " + clause["fmt"]


_VALUES = re.compile(rb"\bVALUES\b", re.IGNORECASE)
_FORMAT_WORD = re.compile(rb"\bFORMAT\b", re.IGNORECASE)
_WHERE = re.compile(rb"\sWHERE\s+(.+?)\s*\Z", re.IGNORECASE | re.DOTALL)
_INPUT_FUNCTION = re.compile(rb"\binput\s*\(\s*'((?:[^'\\]|\\.)*)'\s*\)", re.IGNORECASE)
_DATA_FORMAT = re.compile(rb"\s\bFORMAT\s+([A-Za-z0-9_]+)[ \t\f]*\r?\n?", re.IGNORECASE)


def insert_select_from_input(sql: bytes, path: Path) -> bytes | None:
    """`INSERT ... SELECT ... FROM file('path', fmt, 'structure') ...`, the data written to
    `path`, for an `INSERT ... SELECT ... FROM input('structure') ... FORMAT fmt <data>`; None
    for any other INSERT.

    A real server streams the request body through input(); chDB has no request body, so the
    same rows are read from a file with the same structure, through the same SELECT (its
    WHERE, a guard, is evaluated as on a server: once, as the insert starts).
    """
    parts = input_insert(sql)
    if parts is None:
        return None
    function, data_format = parts
    path.write_bytes(sql[data_format.end() :])
    quoted = str(path).replace("\\", "\\\\").replace("'", "\\'").encode()
    source = b"file('" + quoted + b"', '" + data_format.group(1) + b"', '" + function[1] + b"')"
    return sql[: function.start()] + source + sql[function.end() : data_format.start()]


def input_insert(sql: bytes) -> tuple[re.Match[bytes], re.Match[bytes]] | None:
    """The `input('structure')` call and the `FORMAT fmt` that ends the statement before its
    data, in an `INSERT ... SELECT ... FROM input(...)`; None for any other INSERT."""
    function = _INPUT_FUNCTION.search(sql)
    if function is None:
        return None
    data_format = _DATA_FORMAT.search(sql, function.end())
    if data_format is None:
        raise ClickHouseError.of(
            _SYNTAX_ERROR, "input() needs a FORMAT clause before its data", "SYNTAX_ERROR"
        )
    return function, data_format


def _values_insert(sql: bytes) -> bool:
    """An `INSERT ... VALUES (...)` statement (one line: the consumer's bookkeeping rows),
    which the fault hooks and the insert counters leave alone: they model data inserts."""
    head = sql.split(b"\n", 1)[0]
    return bool(_VALUES.search(head)) and not _FORMAT_WORD.search(head)


def insert_table(sql: bytes) -> str:
    """The table an INSERT writes to, without database or quotes ('' for INSERT INTO FUNCTION)."""
    head = _LEADING_NOISE.match(sql)
    into = _INSERT_INTO.match(sql, head.end() if head else 0)
    if into is None or _FUNCTION_NAME.match(sql, into.end()):
        return ""
    name = _QUALIFIED_NAME.match(sql, into.end())
    if name is None:
        return ""
    last = re.split(rb"\s*\.\s*", name.group(0))[-1]
    return last.strip(b'`"').decode(errors="replace")


def _insert_target_end(sql: bytes) -> int:
    """Index just past `INSERT INTO t [(cols)]`, where the grammar puts SETTINGS."""
    head = _LEADING_NOISE.match(sql)
    into = _INSERT_INTO.match(sql, head.end() if head else 0)
    if into is None:
        raise _unplaceable(sql)
    function = _FUNCTION_NAME.match(sql, into.end())
    if function:
        pos = _skip_parentheses(sql, function.end())
    else:
        name = _QUALIFIED_NAME.match(sql, into.end())
        if name is None:
            raise _unplaceable(sql)
        pos = name.end()
    columns = re.compile(rb"\s*\(").match(sql, pos)
    if columns:
        pos = _skip_parentheses(sql, columns.end() - 1)
    return pos


def _skip_parentheses(sql: bytes, pos: int) -> int:
    """Index just past the parenthesis group opening at `pos`, skipping quoted text."""
    depth = 0
    quote: int | None = None
    index = pos
    while index < len(sql):
        char = sql[index]
        if quote is not None:
            if char == 0x5C:  # backslash escapes the next byte
                index += 1
            elif char == quote:
                quote = None
        elif char in b"'`\"":
            quote = char
        elif char == 0x28:
            depth += 1
        elif char == 0x29:
            depth -= 1
            if depth == 0:
                return index + 1
        index += 1
    raise _unplaceable(sql)


def _unplaceable(sql: bytes) -> ClickHouseError:
    head = sql[:120].decode(errors="replace")
    return ClickHouseError.of(
        _SYNTAX_ERROR,
        f"test server cannot find where the SETTINGS clause goes in: {head}",
        "SYNTAX_ERROR",
    )


# --- the engine --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Query:
    sql: bytes
    settings: dict[str, str]
    params: dict[str, str]
    database: str
    default_format: str


@dataclass(frozen=True)
class Outcome:
    body: bytes
    result_format: str | None
    summary: dict[str, str]
    rows_written: int


class Engine:
    """One chDB session; one query at a time (a Session is not safe for concurrent queries)."""

    def __init__(self, path: str) -> None:
        # ~260 MB, and one data path per process: only the server process loads chDB.
        chdb_session: Any = importlib.import_module("chdb.session")
        self._session: Any = chdb_session.Session(path)
        self._path = Path(path)
        self._lock = threading.Lock()
        self._database: str | None = None
        self.version, self.timezone, compression = (
            self._run(
                b"SELECT version(), timezone(), value FROM system.settings"
                b" WHERE name = 'enable_http_compression'",
                "TabSeparated",
                {},
            )
            .body.decode()
            .strip()
            .split("\t")
        )
        self.http_compression_default = compression == "1"

    def execute(self, query: Query) -> Outcome:
        with self._lock:
            self._use(query.database)
            keyword = statement_keyword(query.sql)
            if keyword == "INSERT":
                sql = query.sql
                if query.settings:
                    sql = insert_with_settings(sql, settings_clause(query.settings))
                outcome = self._run_insert(sql, query.default_format, query.params)
            else:
                outcome = self._run_with_settings(query, keyword)
            if keyword == "USE":
                self._database = None
            return outcome

    def evaluate_guard(self, query: Query) -> Query:
        """An `INSERT ... SELECT ... FROM input(...) WHERE <guard> FORMAT ...` with its guard
        evaluated now (raising as the server would) and replaced by true; others unchanged."""
        parts = input_insert(query.sql)
        if parts is None:
            return query
        function, data_format = parts
        where = _WHERE.search(query.sql, function.end(), data_format.start())
        if where is None:
            return query
        with self._lock:
            self._use(query.database)
            self._run(b"SELECT " + where.group(1), "TabSeparated", {})
        sql = query.sql[: where.start(1)] + b"1" + query.sql[where.end(1) :]
        return dataclasses.replace(query, sql=sql)

    def matching(self, where: bytes, query_ids: list[str]) -> list[str]:
        """The query ids for which the engine finds the KILL QUERY condition `where` true."""
        if not query_ids:
            return []
        listed = ",".join(
            "'" + q.replace("\\", "\\\\").replace("'", "\\'") + "'" for q in query_ids
        )
        sql = (
            b"SELECT query_id FROM (SELECT arrayJoin([" + listed.encode() + b"]) AS query_id)"
            b" WHERE " + where
        )
        with self._lock:
            outcome = self._run(sql, "TabSeparated", {})
        return outcome.body.decode().split()

    def close(self) -> None:
        if self._lock.acquire(timeout=10):
            self._session.close()

    def _use(self, database: str) -> None:
        if database != self._database:
            quoted = database.replace("\\", "\\\\").replace("`", "\\`")
            self._run(f"USE `{quoted}`".encode(), "TabSeparated", {})
            self._database = database

    def _run_with_settings(self, query: Query, keyword: str) -> Outcome:
        statement = query.sql.rstrip().rstrip(b";").rstrip()
        own_format = _TRAILING_FORMAT.search(statement)
        result_format = None
        if keyword in _OUTPUT_STATEMENTS or own_format:
            result_format = own_format.group(1).decode() if own_format else query.default_format
        if not query.settings:
            return self._run(statement, query.default_format, query.params, result_format)
        clause = settings_clause(query.settings)
        if own_format:
            candidates = [statement + b"\nSETTINGS " + clause]
        else:
            fmt = query.default_format.encode()
            candidates = [statement + b"\nFORMAT " + fmt + b" SETTINGS " + clause]
        if keyword in ("DELETE", "UPDATE"):
            candidates.append(statement + b"\nSETTINGS " + clause)
        for candidate in candidates:
            try:
                return self._run(candidate, query.default_format, query.params, result_format)
            except ClickHouseError as exc:
                if not exc.syntax_error_from(len(statement)):
                    raise
        # The grammar has no SETTINGS clause here: let chDB judge the settings, then run it.
        self._run(b"SELECT 1 FORMAT Null SETTINGS " + clause, "TabSeparated", {})
        print(
            f"settings checked, not applicable to {keyword}: {sorted(query.settings)}",
            file=sys.stderr,
        )
        return self._run(statement, query.default_format, query.params, result_format)

    def _run_insert(self, sql: bytes, fmt: str, params: dict[str, str]) -> Outcome:
        spill = self._path / f"inline-{uuid.uuid4().hex}.data"
        try:
            rewritten = insert_select_from_input(sql, spill) or insert_from_file(sql, spill)
            return self._run(rewritten or sql, fmt, params)
        finally:
            spill.unlink(missing_ok=True)

    def _run(
        self, sql: bytes, fmt: str, params: dict[str, str], result_format: str | None = None
    ) -> Outcome:
        try:
            result = self._session.query(sql, fmt, params=params or None)
        except Exception as exc:
            raise ClickHouseError.from_chdb(exc) from exc
        summary = {
            "read_rows": str(result.storage_rows_read()),
            "read_bytes": str(result.storage_bytes_read()),
            "written_rows": str(result.rows_written()),
            "written_bytes": str(result.bytes_written()),
            "total_rows_to_read": "0",
            "result_rows": str(result.rows_read()),
            "result_bytes": str(result.bytes_read()),
            "elapsed_ns": str(int(result.elapsed() * 1e9)),
        }
        return Outcome(bytes(result.bytes()), result_format, summary, int(result.rows_written()))


# --- fault hooks and counters --------------------------------------------------------------


@dataclass(frozen=True)
class InjectedFailure:
    """How an injected INSERT failure answers, and which INSERTs it applies to."""

    code: int = _UNKNOWN_EXCEPTION  # _NO_CLICKHOUSE_CODE: answered by "a proxy"
    status: int = 500
    message: str = ""
    table: str = ""  # '' for every table

    @classmethod
    def from_params(cls, params: dict[str, str]) -> InjectedFailure:
        return cls(
            code=int(params.get("code") or _UNKNOWN_EXCEPTION),
            status=int(params.get("status") or 500),
            message=params.get("message", ""),
            table=params.get("table", ""),
        )

    def applies_to(self, table: str) -> bool:
        return not self.table or self.table == table

    def error(self, hook: str) -> ClickHouseError:
        if self.code == _NO_CLICKHOUSE_CODE:
            return ClickHouseError.from_proxy(self.status)
        message = self.message or f"insert failed on purpose (test server {hook} hook)"
        return ClickHouseError.of(self.code, message, "INJECTED_FAILURE", self.status)


@dataclass
class Faults:
    """What tests inject and observe; every field is guarded by `changed`."""

    changed: threading.Condition = field(default_factory=threading.Condition)
    holding: bool = False
    # "before": held inserts have not started, and KILL QUERY cancels them (code 394);
    # "executing": they count as running, and KILL QUERY waits for them as for any insert
    # past the point where a server can cancel it (SYNC returns once they have landed).
    holding_stage: str = "before"
    hold_after: int | None = None  # data inserts still let through before holding starts
    held: int = 0
    fail_next: int = 0
    lose_answers: int = 0  # data inserts that land, then answer as if they had failed
    drop_answers: int = 0  # data inserts that land, then close the connection unanswered
    profile: dict[str, str] = field(default_factory=dict)  # settings under every query's own
    fail_next_with: InjectedFailure = field(default_factory=InjectedFailure)
    fail_over_bytes: int | None = None
    fail_over_with: InjectedFailure = field(default_factory=InjectedFailure)
    queries: int = 0
    inserts: int = 0
    rows_inserted: int = 0
    failed_inserts: int = 0
    killed_queries: int = 0
    last_request: dict[str, Any] = field(default_factory=dict)
    # The server's system.processes: each running query's id, and whether KILL QUERY hit it.
    running: dict[str, bool] = field(default_factory=dict)
    waiting_kills: int = 0  # KILL QUERY ... SYNC statements waiting for their matches to end

    def begin(self, query_id: str) -> None:
        with self.changed:
            if query_id in self.running:
                raise ClickHouseError.of(
                    _QUERY_WITH_SAME_ID_IS_ALREADY_RUNNING,
                    f"Query with id = {query_id} is already running.",
                    "QUERY_WITH_SAME_ID_IS_ALREADY_RUNNING",
                )
            self.running[query_id] = False

    def end(self, query_id: str) -> None:
        with self.changed:
            del self.running[query_id]
            self.changed.notify_all()

    def running_ids(self) -> list[str]:
        with self.changed:
            return list(self.running)

    def kill(self, query_ids: list[str], *, sync: bool, timeout: float = 60.0) -> None:
        """Cancel the held ones among `query_ids`; with `sync`, wait until all have ended."""
        with self.changed:
            for query_id in query_ids:
                if query_id in self.running:
                    self.running[query_id] = True
            self.changed.notify_all()
            self.waiting_kills += 1
            try:
                ended = not sync or self.changed.wait_for(
                    lambda: not any(q in self.running for q in query_ids), timeout
                )
            finally:
                self.waiting_kills -= 1
            if not ended:
                raise ClickHouseError.of(
                    _UNKNOWN_EXCEPTION, f"KILL QUERY SYNC timed out after {timeout} s", "TIMEOUT"
                )

    def admit_insert(self, query_id: str, table: str, body_bytes: int) -> None:
        """Wait while inserts are held, then raise the injected failure if one is due."""
        with self.changed:
            if self.hold_after is not None:  # hold from the (N+1)-th insert on
                if self.hold_after == 0:
                    self.holding, self.hold_after = True, None
                else:
                    self.hold_after -= 1
            self.held += 1
            self.changed.notify_all()
            if self.holding and self.holding_stage == "executing":
                self.changed.wait_for(lambda: not self.holding)
                self.held -= 1
                return
            self.changed.wait_for(lambda: not self.holding or self.running[query_id])
            self.held -= 1
            if self.running[query_id]:
                self.killed_queries += 1
                raise ClickHouseError.of(
                    _QUERY_WAS_CANCELLED, "Query was cancelled.", "QUERY_WAS_CANCELLED"
                )
            if self.fail_next > 0 and self.fail_next_with.applies_to(table):
                self.fail_next -= 1
                raise self.fail_next_with.error("fail_inserts")
            over = self.fail_over_bytes
            if over is not None and body_bytes > over and self.fail_over_with.applies_to(table):
                raise self.fail_over_with.error("fail_inserts_over")

    def record(self, request: dict[str, Any], is_insert: bool, outcome: Outcome | None) -> None:
        with self.changed:
            self.queries += 1
            self.last_request = request
            if is_insert and outcome is None:
                self.failed_inserts += 1
            elif is_insert and outcome is not None:
                self.inserts += 1
                self.rows_inserted += outcome.rows_written

    def holds_executing(self) -> bool:
        with self.changed:
            return self.holding and self.holding_stage == "executing"

    def hold(self, on: bool, stage: str = "before", *, after: int | None = None) -> None:
        if stage not in ("before", "executing"):
            raise ValueError(f"no hold stage {stage}")
        with self.changed:
            if on:
                self.holding_stage = stage
            if on and after is not None:
                self.hold_after = after  # admit_insert starts holding after that many
            else:
                self.holding = on
            self.changed.notify_all()

    def profile_settings(self) -> dict[str, str]:
        with self.changed:
            return dict(self.profile)

    def drop_answer(self) -> bool:
        """True (once per `drop_answers`) for an insert that landed: no answer goes back."""
        return self._take("drop_answers")

    def lose_answer(self) -> bool:
        """True (once per `lose_answers`) for an insert that landed: its answer is lost."""
        return self._take("lose_answers")

    def _take(self, counter: str) -> bool:
        with self.changed:
            left = getattr(self, counter)
            if left > 0:
                setattr(self, counter, left - 1)
            return bool(left > 0)

    def fail(self, count: int, failure: InjectedFailure) -> None:
        with self.changed:
            self.fail_next, self.fail_next_with = count, failure

    def fail_over(self, size: int, failure: InjectedFailure) -> None:
        with self.changed:
            self.fail_over_bytes, self.fail_over_with = size, failure

    def reset(self) -> None:
        with self.changed:
            self.holding = False
            self.fail_next = self.lose_answers = self.drop_answers = 0
            self.queries = self.inserts = 0
            self.profile = {}
            self.holding_stage, self.hold_after = "before", None
            self.fail_over_bytes = None
            self.rows_inserted = self.failed_inserts = self.killed_queries = 0
            self.last_request = {}
            self.changed.notify_all()

    def wait_held(self, count: int, timeout: float) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: self.held >= count, timeout)

    def snapshot(self) -> dict[str, Any]:
        with self.changed:
            return {
                "queries": self.queries,
                "inserts": self.inserts,
                "rows_inserted": self.rows_inserted,
                "failed_inserts": self.failed_inserts,
                "killed_queries": self.killed_queries,
                "held_inserts": self.held,
                "running_queries": len(self.running),
                "waiting_kills": self.waiting_kills,
                "pending_failures": self.fail_next,
                "failing_inserts_over_bytes": self.fail_over_bytes,
                "holding": self.holding,
                "last_request": self.last_request,
            }


# --- HTTP --------------------------------------------------------------------------------------


class Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(
        self, address: tuple[str, int], engine: Engine, users: dict[str, str], faults: Faults
    ) -> None:
        super().__init__(address, Handler)
        self.engine = engine
        self.users = users
        self.faults = faults


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Server

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: a test run makes thousands of requests."""

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        params = dict(parse_qsl(url.query, keep_blank_values=True))
        body = self._read_body()
        if url.path.startswith("/_test/"):
            self._hook(url.path.removeprefix("/_test/"), params)
        elif url.path == "/ping":
            self._send(200, b"Ok.\n", {"Content-Type": "text/plain; charset=UTF-8"})
        elif url.path not in ("", "/"):
            self._send(404, f"There is no handle {url.path}\n".encode(), {})
        else:
            query_id = params.get("query_id") or str(uuid.uuid4())
            try:
                self._query(params, body, query_id)
            except _AnswerDropped:
                self.close_connection = True  # nothing is written back: the client sees EOF
            except ClickHouseError as exc:
                self._send_error(exc, query_id)
            except Exception as exc:  # a bug here must reach the test as an error, not a hang
                error = ClickHouseError.of(1001, f"test server failed: {exc!r}", "STD_EXCEPTION")
                self._send_error(error, query_id)

    def _query(self, params: dict[str, str], body: bytes, query_id: str) -> None:
        self._authenticate(params)
        for flag in ("compress", "decompress"):
            if params.get(flag, "0") not in ("0", "false", ""):
                raise _not_implemented(f"{flag}=1 (ClickHouse block compression)")
        if self.headers.get("Content-Type", "").startswith("multipart/form-data"):
            raise _not_implemented("multipart/form-data bodies (external data, form queries)")
        text = params.get("query", "").encode()
        sql = text + b"\n" + self._decoded(body) if text and body else text or self._decoded(body)
        if not sql.strip():
            self._send(200, b"Ok.\n", {"Content-Type": "text/plain; charset=UTF-8"})
            return
        query = Query(
            sql=sql,
            # A user profile's settings first: the query's own win, as on a real server.
            settings=self.server.faults.profile_settings()
            | {k: v for k, v in params.items() if _is_setting(k)},
            params={k[6:]: v for k, v in params.items() if k.startswith("param_")},
            database=params.get("database") or "default",
            default_format=params.get("default_format") or "TabSeparated",
        )
        engine, faults = self.server.engine, self.server.faults
        keyword = statement_keyword(sql)
        is_insert = keyword == "INSERT" and not _values_insert(sql)
        encoding = self._response_encoding(query)
        seen = {
            "settings": query.settings,
            "content_encoding": self.headers.get("Content-Encoding"),
            "transfer_encoding": self.headers.get("Transfer-Encoding"),
            "accept_encoding": self.headers.get("Accept-Encoding"),
            "response_encoding": encoding,
        }
        faults.begin(query_id)
        try:
            if keyword == "KILL":
                outcome = self._kill_query(sql, query_id)
            elif is_insert:
                outcome = self._insert(query, query_id, len(body))
            else:
                outcome = engine.execute(query)
        except (ClickHouseError, _AnswerDropped) as exc:
            landed = exc.outcome if isinstance(exc, _AnswerDropped) else None
            faults.record(seen, is_insert, landed)
            raise
        finally:
            faults.end(query_id)
        faults.record(seen, is_insert, outcome)
        headers = {
            "Content-Type": "text/plain; charset=UTF-8",
            "X-ClickHouse-Query-Id": query_id,
            "X-ClickHouse-Timezone": query.settings.get("session_timezone") or engine.timezone,
            "X-ClickHouse-Server-Display-Name": DISPLAY_NAME,
            "X-ClickHouse-Summary": json.dumps(outcome.summary, separators=(",", ":")),
        }
        if outcome.result_format:
            headers["X-ClickHouse-Format"] = outcome.result_format
            if outcome.result_format in ("Native", "RowBinary", "Arrow", "Parquet"):
                headers["Content-Type"] = "application/octet-stream"
        body = outcome.body
        if body and encoding:
            body = _RESPONSE_ENCODINGS[encoding](body)
            headers["Content-Encoding"] = encoding
        self._send(200, body, headers)

    def _insert(self, query: Query, query_id: str, body_bytes: int) -> Outcome:
        """A data INSERT through the fault hooks: held, failed, or its answer lost."""
        faults = self.server.faults
        if faults.holds_executing():
            # A server evaluates an INSERT ... SELECT's WHERE as it starts: before the hold,
            # so a guard sees the world of that moment, as on a real server.
            query = self.server.engine.evaluate_guard(query)
        faults.admit_insert(query_id, insert_table(query.sql), body_bytes)
        outcome = self.server.engine.execute(query)
        if faults.drop_answer():
            raise _AnswerDropped(outcome)
        if faults.lose_answer():
            raise ClickHouseError.of(
                _UNKNOWN_EXCEPTION,
                "the insert landed, and this answer stands for one lost on the way"
                " (test server lose_answers hook)",
                "INJECTED_FAILURE",
            )
        return outcome

    def _kill_query(self, sql: bytes, own_id: str) -> Outcome:
        """KILL QUERY over the queries this server is running (see the module docstring)."""
        statement = _KILL_QUERY.match(sql)
        if statement is None:
            raise _not_implemented("KILL other than `KILL QUERY WHERE <cond> [SYNC|ASYNC|TEST]`")
        faults = self.server.faults
        others = [q for q in faults.running_ids() if q != own_id]
        matches = self.server.engine.matching(statement.group("where"), others)
        mode = (statement.group("mode") or b"SYNC").upper()
        if mode != b"TEST":
            faults.kill(matches, sync=mode == b"SYNC")
        status = {b"SYNC": "finished", b"ASYNC": "waiting", b"TEST": "pending"}[mode]
        rows = "".join(f"{status}\t{q}\tdefault\t\n" for q in matches).encode()
        return Outcome(rows, "TabSeparated", {}, 0)

    def _response_encoding(self, query: Query) -> str | None:
        """The first of the real server's preferred encodings the client accepts, if enabled."""
        setting = query.settings.get("enable_http_compression")
        if setting is None:
            enabled = self.server.engine.http_compression_default
        else:
            enabled = setting.strip().lower() in ("1", "true")
        accepted = self.headers.get("Accept-Encoding", "")
        if enabled:
            for name in _RESPONSE_ENCODINGS:
                if name in accepted:
                    return name
        return None

    def _authenticate(self, params: dict[str, str]) -> None:
        authorization = self.headers.get("Authorization")
        if authorization:
            scheme, _, value = authorization.partition(" ")
            if scheme.lower() != "basic":
                raise _auth_failed("default", "only Basic authentication is implemented")
            user, _, password = base64.b64decode(value).decode().partition(":")
        elif "X-ClickHouse-User" in self.headers:
            user = self.headers["X-ClickHouse-User"]
            password = self.headers.get("X-ClickHouse-Key", "")
        else:
            user, password = params.get("user", "default"), params.get("password", "")
        expected = self.server.users.get(user)
        if expected is None or not hmac.compare_digest(expected.encode(), password.encode()):
            raise _auth_failed(user, "password is incorrect, or there is no user with such name")

    def _decoded(self, body: bytes) -> bytes:
        encoding = self.headers.get("Content-Encoding", "").strip().lower()
        try:
            return _decompress(encoding, body)
        except ClickHouseError:
            raise
        except Exception as exc:
            raise ClickHouseError.of(
                _UNKNOWN_EXCEPTION, f"cannot decode {encoding} request body: {exc}", "STD_EXCEPTION"
            ) from exc

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _hook(self, name: str, params: dict[str, str]) -> None:
        faults = self.server.faults
        if name == "hold_inserts":
            after = int(params["after"]) if "after" in params else None
            faults.hold(True, params.get("stage", "before"), after=after)
        elif name == "release_inserts":
            faults.hold(False)
        elif name == "fail_inserts":
            faults.fail(int(params.get("count", "1")), InjectedFailure.from_params(params))
        elif name == "profile":
            with faults.changed:
                faults.profile = {k: v for k, v in params.items() if _is_setting(k)}
        elif name == "lose_answers":
            with faults.changed:
                faults.lose_answers = int(params.get("count", "1"))
        elif name == "drop_answers":
            with faults.changed:
                faults.drop_answers = int(params.get("count", "1"))
        elif name == "fail_inserts_over":
            faults.fail_over(int(params["bytes"]), InjectedFailure.from_params(params))
        elif name == "reset":
            faults.reset()
        elif name == "wait_held":
            count, timeout = int(params.get("count", "1")), float(params.get("timeout", "10"))
            if not faults.wait_held(count, timeout):
                self._send_json(408, faults.snapshot())
                return
        elif name != "stats":
            self._send(404, f"no test hook {name}\n".encode(), {})
            return
        self._send_json(200, faults.snapshot())

    def _send_json(self, status: int, payload: dict[str, Any]) -> None:
        self._send(status, json.dumps(payload).encode(), {"Content-Type": "application/json"})

    def _send_error(self, exc: ClickHouseError, query_id: str) -> None:
        if exc.code == _NO_CLICKHOUSE_CODE:
            self._send(exc.status, exc.text.encode(), {"Content-Type": "text/html"})
            return
        text = exc.text
        if "(version " not in text:
            text = f"{text} (version {self.server.engine.version})"
        body = f"{text}\n".encode()
        headers = {
            "Content-Type": "text/plain; charset=UTF-8",
            "X-ClickHouse-Exception-Code": str(exc.code),
            "X-ClickHouse-Query-Id": query_id,
            "X-ClickHouse-Server-Display-Name": DISPLAY_NAME,
        }
        self._send(exc.status, body, headers)

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def _is_setting(name: str) -> bool:
    return bool(name) and name not in _PROTOCOL_PARAMS and not name.startswith("param_")


def _decompress(encoding: str, body: bytes) -> bytes:
    if encoding in ("", "identity") or not body:
        return body
    if encoding == "gzip":
        return gzip.decompress(body)
    if encoding == "deflate":
        return zlib.decompress(body)
    if encoding == "zstd":
        return zstd.decompress(body)
    if encoding == "lz4":  # clickhouse-connect sends one LZ4 frame per block
        out = []
        while body:
            decompressor = lz4.frame.LZ4FrameDecompressor()
            out.append(decompressor.decompress(body))
            body = decompressor.unused_data
        return b"".join(out)
    if encoding == "br":
        import brotli  # type: ignore[import-not-found]  # optional, as in clickhouse-connect

        return bytes(brotli.decompress(body))
    raise _not_implemented(f"Content-Encoding {encoding}")


def _not_implemented(what: str) -> ClickHouseError:
    return ClickHouseError.of(
        _NOT_IMPLEMENTED, f"the chDB test server does not implement {what}", "NOT_IMPLEMENTED"
    )


def _auth_failed(user: str, why: str) -> ClickHouseError:
    return ClickHouseError.of(
        _AUTHENTICATION_FAILED,
        f"{user}: Authentication failed: {why}",
        "AUTHENTICATION_FAILED",
        403,
    )


# --- entry point -------------------------------------------------------------------------------


def _user(text: str) -> tuple[str, str]:
    name, sep, password = text.partition(":")
    if not name or not sep:
        raise argparse.ArgumentTypeError("expected NAME:PASSWORD")
    return name, password


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--path", required=True, help="chDB data directory")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument(
        "--user", type=_user, action="append", default=[], help="NAME:PASSWORD, repeatable"
    )
    args = parser.parse_args(argv)

    engine = Engine(args.path)
    users = {"default": "", **dict(args.user)}
    faults = Faults()
    server = Server(("127.0.0.1", args.port), engine, users, faults)

    def stop(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    host, port = server.server_address[:2]
    print(f"listening {host!s}:{port}", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        faults.hold(False)
        server.server_close()
        engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
