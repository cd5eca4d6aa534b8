"""ClickHouse: encode outbox rows once as JSONEachRow, ship them through one of two transports.

- `HttpTransport`: clickhouse-connect over HTTP(S), for production (`CLICKHOUSE_URL=http://…`).
- `ChdbTransport`: the same engine in process through chDB (`CLICKHOUSE_URL=chdb:///path`), for
  the embedded demo.
Both send the same bytes with the same SQL and settings, so what the tests prove about one
holds for the other.
"""

from __future__ import annotations

import re
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from itertools import count
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

import orjson

from cdc_consumer.errors import ErrorKind, PipelineError
from cdc_consumer.pgoutput import Relation
from cdc_consumer.sink import ORIGIN, SourcePosition

EVENT_LOG_TABLE = "event_log"
# pgoutput sends timestamptz as text with a variable number of fractional digits and an offset
# (`2026-11-25 07:49:31.12345+00`); ClickHouse parses it when told to make its best effort.
# A NULL must fail the row rather than become an empty string or a zero: it is dead-lettered.
INSERT_SETTINGS: dict[str, str] = {
    "date_time_input_format": "best_effort",
    "input_format_null_as_default": "0",
}
DEAD_LETTER_TABLE = "event_log_dead_letter"
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
_ROW_POSITION = re.compile(rb'"source_lsn":(\d+),"source_seq":(\d+)}$')
_ROW_EVENT_ID = re.compile(rb'^\{"event_id":(null|"[^"]*")')
# A row the encoder cannot make JSON of (text that is not UTF-8, as a SQL_ASCII database stores
# it) travels in its batch as a line starting with NUL, which PostgreSQL text and JSON never
# hold, so one scan of a batch finds it: NUL, the reason, NUL, the row with its bytes escaped.
# The line keeps the row's place in source order; `write` refuses a batch holding one before
# sending anything, and the halving that isolates rejected rows dead-letters it.
_UNENCODABLE = b"\x00"
# Integers come back as JSON numbers, so both transports return the same Python values.
SELECT_SETTINGS: dict[str, str] = {"output_format_json_quote_64bit_integers": "0"}

_MEMO_LIMIT = 10_000  # distinct event types and environments remembered per relation
# The outbox columns event_log is built from (the backfill reads them as text, too).
OUTBOX_COLUMNS = (
    "event_id",
    "event_type",
    "event_date_time",
    "environment",
    "event_context",
    "metadata_version",
    "trace_id",  # NULL when the publisher was not traced: written as ''
)


class ClickHouseTransport(Protocol):
    """What the consumer needs from a ClickHouse connection."""

    def command(self, sql: str) -> None: ...

    def select(self, sql: str) -> list[list[Any]]: ...

    def insert(self, table: str, body: bytes, query_id: str) -> None: ...

    def close(self) -> None: ...


class HttpTransport:
    """clickhouse-connect over HTTP(S); errors surface as transient sink failures."""

    def __init__(self, url: str) -> None:
        import clickhouse_connect  # noqa: PLC0415  (keeps chdb-only processes lean)

        self._client = clickhouse_connect.get_client(dsn=url, autogenerate_session_id=False)

    def command(self, sql: str) -> None:
        with _sink_errors():
            self._client.command(sql)

    def select(self, sql: str) -> list[list[Any]]:
        with _sink_errors():
            raw = self._client.raw_query(sql, settings=SELECT_SETTINGS, fmt="JSONCompact")
        return list(orjson.loads(raw)["data"])

    def insert(self, table: str, body: bytes, query_id: str) -> None:
        with _sink_errors():
            self._client.raw_insert(
                table,
                insert_block=body,
                settings={**INSERT_SETTINGS, "query_id": query_id},
                fmt="JSONEachRow",
            )

    def close(self) -> None:
        self._client.close()


class ChdbTransport:
    # chdb ships py.typed but no annotations, hence the no-untyped-call ignores below.
    """The ClickHouse engine in process: one data directory per process, one query at a time."""

    def __init__(self, path: str, database: str = "default") -> None:
        from chdb.session import Session  # noqa: PLC0415  (~260 MB: load only when asked)

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

    def select(self, sql: str) -> list[list[Any]]:
        raw = self._query(f"{sql} SETTINGS {_settings_clause(SELECT_SETTINGS)}", "JSONCompact")
        return list(orjson.loads(raw)["data"]) if raw else []

    def insert(self, table: str, body: bytes, query_id: str) -> None:
        # No query_id: an insert runs inside this process and cannot outlive it, so there is
        # never an earlier run's insert to find (see ClickHouseSink.fence_earlier_runs).
        del query_id
        # Inline data is safe here: chDB ends it at a blank line, and encoded rows are one line
        # each (JSON escapes every newline inside them), joined by single newlines.
        head = (
            f"INSERT INTO {table} SETTINGS {_settings_clause(INSERT_SETTINGS)} FORMAT JSONEachRow\n"
        )
        self._query(head + body.decode())

    def close(self) -> None:
        self._session.close()  # type: ignore[no-untyped-call]


def _settings_clause(settings: dict[str, str]) -> str:
    return ", ".join(f"{key} = '{value}'" for key, value in settings.items())


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


def connect(url: str) -> ClickHouseTransport:
    """A transport for CLICKHOUSE_URL: http(s)://user:pass@host:port/db or chdb:///path."""
    parts = urlsplit(url)
    if parts.scheme == "chdb":
        database = parse_qs(parts.query).get("database", ["default"])[0]
        return ChdbTransport(parts.path, database)
    return HttpTransport(url)


class EventLogEncoder:
    """Turns decoded event_outbox inserts into JSONEachRow lines for `event_log`.

    Built from the Relation message, so columns are found by name and a column added to the
    outbox later does not shift anything. The jsonb context is spliced in as PostgreSQL sent it
    (it is valid JSON by construction) and also kept verbatim in `event_context_raw`.
    """

    def __init__(self, relation: Relation) -> None:
        names = [column.name for column in relation.columns]
        missing = [name for name in OUTBOX_COLUMNS if name not in names]
        if missing:
            raise PipelineError(
                ErrorKind.CONFIGURATION,
                f"event_outbox lacks columns {missing}",
                hint="run `python -m cdc_consumer migrate` against this database",
            )
        self._index = tuple(names.index(name) for name in OUTBOX_COLUMNS)
        self._strings: dict[bytes, bytes] = {}

    def _json_string(self, text: bytes) -> bytes:
        """JSON string for a low-cardinality text value (event type, environment), memoised."""
        quoted = self._strings.get(text)
        if quoted is None:
            quoted = orjson.dumps(text.decode())
            if len(self._strings) < _MEMO_LIMIT:
                self._strings[text] = quoted
        return quoted

    def encode(self, values: Sequence[object], position: SourcePosition) -> bytes:
        try:
            return self._encode(values, position)
        except UnicodeDecodeError:
            return _unencodable(values, self._index, position)

    def _encode(self, values: Sequence[object], position: SourcePosition) -> bytes:
        event_id, event_type, date_time, environment, context, version, trace_id = (
            values[i] for i in self._index
        )
        if not (
            isinstance(event_id, bytes)
            and isinstance(event_type, bytes)
            and isinstance(date_time, bytes)
            and isinstance(environment, bytes)
            and isinstance(context, bytes)
            and isinstance(version, bytes)
        ):
            # Cannot happen with the outbox's NOT NULL, insert-only contract; if it does, the
            # row is written with JSON nulls, ClickHouse refuses it, and it is dead-lettered.
            return _escaped_row(values, self._index, position)
        # uuid, timestamptz and bigint text is plain ASCII without quotes or backslashes, so it
        # is spliced as is; only the free-text columns need JSON string escaping.
        return b"".join(
            (
                b'{"event_id":"',
                event_id,
                b'","event_type":',
                self._json_string(event_type),
                b',"event_date_time":"',
                date_time,
                b'","environment":',
                self._json_string(environment),
                b',"event_context":',
                context,
                b',"event_context_raw":',
                orjson.dumps(context.decode()),
                b',"metadata_version":',
                version,
                b',"trace_id":',
                orjson.dumps(trace_id.decode()) if isinstance(trace_id, bytes) else b'""',
                b',"source_lsn":%d,"source_seq":%d}' % position,
            )
        )


def _dead_letter(row: bytes, error: str, *, minimal: bool = False) -> bytes:
    """The dead-letter record of an encoded event_log row (whose tail we wrote ourselves); a
    minimal one leaves the row text out: its position and event id still account for it."""
    if row.startswith(_UNENCODABLE):
        row = row[row.index(_UNENCODABLE, 1) + 1 :]  # the escaped row, without the reason
    position = _ROW_POSITION.search(row)
    event_id = _ROW_EVENT_ID.match(row)
    return orjson.dumps(
        {
            "source_lsn": int(position.group(1)) if position else 0,
            "source_seq": int(position.group(2)) if position else 0,
            "event_id": orjson.loads(event_id.group(1)) or "" if event_id else "",
            "row": "" if minimal else row.decode(errors="replace"),
            "error": error,
        }
    )


def _escaped_row(
    values: Sequence[object], index: tuple[int, ...], position: SourcePosition
) -> bytes:
    """The row as JSON text, whatever it holds: NULL as null, bytes that are not UTF-8 as
    `\\xNN` escapes, and the position last, where `_ROW_POSITION` finds it."""
    row: dict[str, object] = {}
    for name, i in zip(OUTBOX_COLUMNS, index, strict=True):
        value = values[i]
        row[name] = value.decode(errors="backslashreplace") if isinstance(value, bytes) else None
    row["source_lsn"], row["source_seq"] = position
    return orjson.dumps(row)


def _unencodable(
    values: Sequence[object], index: tuple[int, ...], position: SourcePosition
) -> bytes:
    """The line that stands for a row whose text is not UTF-8 (see `_UNENCODABLE`)."""
    reason = "a column is not valid UTF-8"
    for name, i in zip(OUTBOX_COLUMNS, index, strict=True):
        value = values[i]
        try:
            if isinstance(value, bytes):
                value.decode()
        except UnicodeDecodeError as exc:
            reason = f"{name} is not valid UTF-8 (byte {exc.start}: {exc.reason})"
            break
    escaped = _escaped_row(values, index, position)
    return b"".join((_UNENCODABLE, reason.encode(), _UNENCODABLE, escaped))


class ClickHouseSink:
    """`EventSink` over a transport: one INSERT per batch into event_log.

    Every insert carries the query id `cdc-<slot>-<run>-<n>`: the slot names the consumer (one
    slot, one consumer at a time), the run is this process. That is what lets a new run find
    inserts an earlier, killed run left executing on the server.
    """

    def __init__(self, transport: ClickHouseTransport, *, slot: str) -> None:
        self._transport = transport
        self._slot_prefix = f"cdc-{slot}-"
        self._run_prefix = f"{self._slot_prefix}{uuid.uuid4().hex}-"
        self._inserts = count(1)

    def _insert(self, table: str, body: bytes) -> None:
        self._transport.insert(table, body, f"{self._run_prefix}{next(self._inserts)}")

    def write(self, rows: list[bytes]) -> None:
        body = b"\n".join(rows)
        unencodable = body.find(_UNENCODABLE)
        if unencodable >= 0:
            reason = body[unencodable + 1 : body.index(_UNENCODABLE, unencodable + 1)]
            raise PipelineError(
                ErrorKind.POISON_EVENT,
                f"the row cannot be encoded for clickhouse: {reason.decode()}",
                hint="it is isolated into event_log_dead_letter with its bytes escaped; the"
                " source database holds text that is not UTF-8",
            )
        self._insert(EVENT_LOG_TABLE, body)

    def write_dead_letters(self, rows: list[bytes], error: str, *, minimal: bool = False) -> None:
        records = (_dead_letter(row, error, minimal=minimal) for row in rows)
        self._insert(DEAD_LETTER_TABLE, b"\n".join(records))

    def fence_earlier_runs(self) -> None:
        # A ClickHouse server finishes an insert whose client died once it has the whole body.
        # If a killed run's insert were still executing, the watermark read next would miss
        # rows that land a moment later, and the replay would send them again in a batch cut
        # differently, which insert deduplication does not recognise. KILL ... SYNC cancels
        # such inserts, or waits for them to finish, before it returns. A single-block insert
        # is atomic, so afterwards each one is either wholly in the table or not at all.
        self._transport.command(
            f"KILL QUERY WHERE startsWith(query_id, '{self._slot_prefix}')"
            f" AND NOT startsWith(query_id, '{self._run_prefix}') SYNC"
        )

    def high_watermark(self) -> SourcePosition:
        rows = self._transport.select(
            "SELECT source_lsn, source_seq FROM ("
            f" SELECT source_lsn, source_seq FROM {EVENT_LOG_TABLE}"
            f" UNION ALL SELECT source_lsn, source_seq FROM {DEAD_LETTER_TABLE})"
            " ORDER BY source_lsn DESC, source_seq DESC LIMIT 1"
        )
        return SourcePosition(int(rows[0][0]), int(rows[0][1])) if rows else ORIGIN

    def close(self) -> None:
        self._transport.close()
