"""The pure pieces of cdc_consumer/clickhouse.py: what a failed request means, and what the
sink makes of rows it cannot send."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
import pytest
from clickhouse_connect.driver.exceptions import DatabaseError, OperationalError

from cdc_consumer.clickhouse import sink_failure
from cdc_consumer.clickhouse_sink import ClickHouseSink
from cdc_consumer.errors import PipelineError, Policy, policy_for
from cdc_consumer.event_log import EventLogEncoder
from cdc_consumer.outbox import OUTBOX_COLUMNS
from cdc_consumer.pgoutput import Column, Relation
from cdc_consumer.sink import SourcePosition

_SERVER = "Received ClickHouse exception, code: {code}, server response: Code: {code}."
_NGINX_413 = (
    "HTTP driver received HTTP status 413, server response: <html>\r\n"
    "<head><title>413 Request Entity Too Large</title></head>\r\n"
)


def _server_error(code: int, message: str) -> DatabaseError:
    """A ClickHouse error as clickhouse-connect raises it (first line: code and message)."""
    return DatabaseError(f"{_SERVER.format(code=code)} DB::Exception: {message}\nstack trace")


_CASES = {
    # limits an insert fits under by being smaller: halve the batch, never retry the same bytes
    "proxy-413": (DatabaseError(_NGINX_413), Policy.SPLIT),
    "query-too-large": (_server_error(229, "Query is too large (300000 bytes)"), Policy.SPLIT),
    "query-memory": (
        _server_error(241, "Query memory limit exceeded: would use 4 MiB"),
        Policy.SPLIT,
    ),
    "query-memory-before-26": (
        _server_error(241, "Memory limit (for query) exceeded: would use 9.32 GiB"),
        Policy.SPLIT,
    ),
    "partitions": (
        _server_error(252, "Too many partitions for single INSERT block (more than 100)"),
        Policy.SPLIT,
    ),
    # the same codes for the whole server's load: ridden out by retrying, halving adds inserts
    "total-memory": (
        _server_error(241, "(total) memory limit exceeded: would use 28 GiB"),
        Policy.RETRY,
    ),
    "user-memory": (
        _server_error(241, "User memory limit exceeded: would use 8 MiB"),
        Policy.RETRY,
    ),
    "too-many-parts": (_server_error(252, "Too many parts (3001) in table"), Policy.RETRY),
    "proxy-502": (
        DatabaseError("HTTP driver received HTTP status 502, server response: "),
        Policy.RETRY,
    ),
    "unreachable": (OperationalError("HTTPConnectionPool: Max retries exceeded"), Policy.RETRY),
    # rejected rows, and recursion that one row's nesting causes: isolate the row
    "duplicate-path": (_server_error(117, "Duplicate path found: a.b"), Policy.DEAD_LETTER),
    "too-deep-recursion": (_server_error(306, "Stack size too large"), Policy.DEAD_LETTER),
}


@pytest.mark.parametrize(("failure", "policy"), _CASES.values(), ids=_CASES.keys())
def test_each_clickhouse_failure_gets_the_policy_that_can_end_it(
    failure: Exception, policy: Policy
) -> None:
    """Too large splits, load on the whole server retries, rejected rows are dead-lettered."""
    assert policy_for(sink_failure(failure)) is policy


class _RecordingTransport:
    """A ClickHouse connection that only keeps what it is sent: the edge of the process."""

    def __init__(self) -> None:
        self.inserts: list[tuple[str, bytes]] = []

    def command(self, sql: str) -> None:
        del sql

    def select(self, sql: str, settings: Any = None) -> list[list[Any]]:
        del sql, settings
        return []

    def insert(self, table: str, rows: Sequence[bytes], **_options: Any) -> None:
        self.inserts.append((table, b"\n".join(rows)))

    def close(self) -> None:
        pass


def _outbox_values(event_id: bytes, event_type: bytes) -> list[bytes | None]:
    """An outbox row as pgoutput sends it, in OUTBOX_COLUMNS order."""
    return [event_id, event_type, b"2026-11-25 07:49:31.12345+00", b"test", b"{}", b"1", None]


def test_a_row_whose_text_is_not_utf8_is_never_sent_and_dead_letters_escaped() -> None:
    """Text that is not UTF-8: its batch is refused unsent; its record keeps the bytes escaped."""
    columns = tuple(Column(0, name, 25, -1) for name in OUTBOX_COLUMNS)
    encoder = EventLogEncoder(
        Relation(1, "public", "event_outbox", "d", columns), source="s", timeline=1
    )
    good = encoder.encode(_outbox_values(b"id-1", b"noted"), SourcePosition(7, 0))
    bad = encoder.encode(_outbox_values(b"id-2", b"not\xffed"), SourcePosition(7, 1))
    transport = _RecordingTransport()
    sink = ClickHouseSink(transport, source="s")

    with pytest.raises(PipelineError) as refused:
        sink.write([good, bad])
    sink.write_dead_letters([bad], str(refused.value))

    assert policy_for(refused.value) is Policy.DEAD_LETTER
    assert "event_type is not valid UTF-8 (byte 3" in str(refused.value)
    [(table, body)] = transport.inserts
    assert table == "event_log_dead_letter"
    record = orjson.loads(body)
    assert (record["source_lsn"], record["source_seq"], record["event_id"]) == (7, 1, "id-2")
    assert orjson.loads(record["row"])["event_type"] == "not\\xffed"
