"""event_log rows: outbox inserts encoded once as JSONEachRow lines, and their dead-letter form.

The encoder is pure (bytes in, bytes out); the sink that ships the lines is in
`clickhouse_sink.py`, the transports in `clickhouse.py`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from operator import itemgetter, methodcaller

import orjson

from cdc_consumer.errors import ErrorKind, PipelineError
from cdc_consumer.outbox import OUTBOX_COLUMNS, OUTBOX_TABLE
from cdc_consumer.pgoutput import Relation
from cdc_consumer.sink import SourcePosition

EVENT_LOG_TABLE = "event_log"
DEAD_LETTER_TABLE = "event_log_dead_letter"
# The keys of each encoded line, which the insert names (a column it does not name keeps its
# DEFAULT, e.g. the dead-letter table's failed_at).
EVENT_LOG_COLUMNS = (
    "event_id",
    "event_type",
    "event_date_time",
    "environment",
    "event_context",
    "event_context_raw",
    "metadata_version",
    "trace_id",
    "source",
    "source_timeline",
    "source_lsn",
    "source_seq",
)
DEAD_LETTER_COLUMNS = (
    "source",
    "source_timeline",
    "source_lsn",
    "source_seq",
    "event_id",
    "row",
    "error",
)
_MEMO_LIMIT = 10_000  # distinct event types and environments remembered per relation
_ROW_POSITION = re.compile(rb'"source_timeline":(\d+),"source_lsn":(\d+),"source_seq":(\d+)}$')
_ROW_EVENT_ID = re.compile(rb'^\{"event_id":(null|"[^"]*")')
# A row the encoder cannot make JSON of (text that is not UTF-8, as a SQL_ASCII database stores
# it) travels in its batch as a line starting with NUL, which PostgreSQL text and JSON never
# hold, so one scan of a batch finds it: NUL, the reason, NUL, the row with its bytes escaped.
# The line keeps the row's place in source order; the sink refuses a batch holding one before
# sending anything, and the halving that isolates rejected rows dead-letters it.
UNENCODABLE = b"\x00"


class EventLogEncoder:
    """Turns decoded event_outbox inserts into JSONEachRow lines for `event_log`.

    Built from the Relation message, so columns are found by name and a column added to the
    outbox later does not shift anything. The jsonb context is spliced in as PostgreSQL sent it
    (it is valid JSON by construction) and also kept verbatim in `event_context_raw`. Every row
    names its source, so several sources can share one event_log without mistaking each
    other's positions for their own, and the timeline it was read on, so a restart after a
    failover skips only positions of its own WAL history (`timeline.py`).
    """

    def __init__(self, relation: Relation, *, source: str, timeline: int) -> None:
        names = [column.name for column in relation.columns]
        missing = [name for name in OUTBOX_COLUMNS if name not in names]
        if missing:
            raise PipelineError(
                ErrorKind.CONFIGURATION,
                f"{OUTBOX_TABLE} lacks columns {missing}",
                hint="run `python -m cdc_consumer migrate` against this database",
            )
        self._index = tuple(names.index(name) for name in OUTBOX_COLUMNS)
        self._pick = itemgetter(*self._index)  # the outbox's columns of a row, in one C call
        self._source = source
        self._timeline = timeline
        self._tail = (
            b',"source":'
            + orjson.dumps(source)
            + b',"source_timeline":%d' % timeline
            + b',"source_lsn":%d,"source_seq":%d}'
        )
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
            return self._unencodable(values, position)

    def _encode(self, values: Sequence[object], position: SourcePosition) -> bytes:
        event_id, event_type, date_time, environment, context, version, trace_id = self._pick(
            values
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
            return self._escaped_row(values, position)
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
                self._tail % position,
            )
        )

    def _escaped_row(self, values: Sequence[object], position: SourcePosition) -> bytes:
        """The row as JSON text, whatever it holds: NULL as null, bytes that are not UTF-8 as
        `\\xNN` escapes, and the position last, where `_ROW_POSITION` finds it."""
        row: dict[str, object] = {}
        for name, i in zip(OUTBOX_COLUMNS, self._index, strict=True):
            value = values[i]
            row[name] = (
                value.decode(errors="backslashreplace") if isinstance(value, bytes) else None
            )
        row["source"] = self._source
        row["source_timeline"] = self._timeline
        row["source_lsn"], row["source_seq"] = position
        return orjson.dumps(row)

    def _unencodable(self, values: Sequence[object], position: SourcePosition) -> bytes:
        """The line that stands for a row whose text is not UTF-8 (see `UNENCODABLE`)."""
        reason = "a column is not valid UTF-8"
        for name, i in zip(OUTBOX_COLUMNS, self._index, strict=True):
            value = values[i]
            try:
                if isinstance(value, bytes):
                    value.decode()
            except UnicodeDecodeError as exc:
                reason = f"{name} is not valid UTF-8 (byte {exc.start}: {exc.reason})"
                break
        escaped = self._escaped_row(values, position)
        return b"".join((UNENCODABLE, reason.encode(), UNENCODABLE, escaped))


def unencodable_reason(rows: Sequence[bytes]) -> str | None:
    """Why a batch cannot be sent, if it holds a row the encoder could not make JSON of."""
    row = next(filter(_marked, rows), None)
    if row is None:
        return None
    return row[1 : row.index(UNENCODABLE, 1)].decode()


_marked = methodcaller("startswith", UNENCODABLE)


def dead_letter_record(row: bytes, error: str, source: str, *, minimal: bool = False) -> bytes:
    """The dead-letter record of an encoded event_log row (whose tail we wrote ourselves); a
    minimal one leaves the row text out: its position and event id still account for it."""
    if row.startswith(UNENCODABLE):
        row = row[row.index(UNENCODABLE, 1) + 1 :]  # the escaped row, without the reason
    position = _ROW_POSITION.search(row)
    event_id = _ROW_EVENT_ID.match(row)
    return orjson.dumps(
        {
            "source": source,
            "source_timeline": int(position.group(1)) if position else 0,
            "source_lsn": int(position.group(2)) if position else 0,
            "source_seq": int(position.group(3)) if position else 0,
            "event_id": orjson.loads(event_id.group(1)) or "" if event_id else "",
            "row": "" if minimal else row.decode(errors="replace"),
            "error": error,
        }
    )
