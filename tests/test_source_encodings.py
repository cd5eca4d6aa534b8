"""Outboxes in databases that are not UTF-8.

pgoutput sends text in the replication connection's client_encoding, which defaults to the
database's own. A LATIN1 (or any other convertible) database is converted by the server; a
SQL_ASCII database stores whatever bytes it was given and sends them on unchanged, which is how
bytes that are not UTF-8 reach the consumer from a real server (checked on PostgreSQL 18).
"""

from __future__ import annotations

import json
from typing import Any

import psycopg
import pytest

from tests.support.fix_clickhouse import clickhouse_select
from tests.support.fix_consumer import Consumer, current_wal_lsn

pytestmark = [pytest.mark.e2e]

_OUTBOX_INSERT = (
    "INSERT INTO event_outbox (event_id, event_type, event_date_time, environment,"
    " event_context, metadata_version) VALUES (gen_random_uuid(), {event_type}, now(), 'test',"
    " {context}, 1) RETURNING event_id::text"
)


def _insert_event(conn: psycopg.Connection[Any], event_type: str, context: str) -> str:
    """Insert an outbox row whose type and context are these SQL expressions; its event id."""
    [[event_id]] = conn.execute(
        _OUTBOX_INSERT.format(event_type=event_type, context=context)
    ).fetchall()
    return str(event_id)


def test_latin1_text_arrives_converted_to_utf8(consumer_over, clickhouse_server) -> None:
    """An outbox in a LATIN1 database: accented text lands in event_log as the same text."""
    # GIVEN a consumer over a LATIN1 database
    consumer, url = consumer_over("LATIN1")
    consumer.start()
    # WHEN an event with accented type and context is published there
    with psycopg.connect(url, autocommit=True) as conn:
        event_id = _insert_event(conn, "'café_noted'", '\'{"city": "Zürich"}\'')
        consumer.wait_confirmed(current_wal_lsn(conn))
    assert consumer.stop() == 0
    # THEN event_log holds the text as published
    rows = clickhouse_select(
        clickhouse_server.url,
        "SELECT event_type, event_context_raw, toString(event_context.city) FROM event_log"
        f" WHERE event_id = '{event_id}'",
    )
    assert rows == [["café_noted", '{"city": "Zürich"}', "Zürich"]]


def _log_lines(text: str, event: str) -> list[dict[str, Any]]:
    """The JSON log lines for `event` in a consumer's log."""
    lines = [json.loads(raw) for raw in text.splitlines() if raw.startswith("{")]
    return [line for line in lines if line["event"] == event]


def _replayable(conn: psycopg.Connection[Any], consumer: Consumer, tag: str) -> int:
    """Messages with pgoutput tag `tag` the (inactive) slot would replay to its next consumer."""
    [[count]] = conn.execute(
        "SELECT count(*) FROM pg_logical_slot_peek_binary_changes(%s, NULL, NULL,"
        " 'proto_version', '1', 'publication_names', %s, 'messages', 'true')"
        " WHERE get_byte(data, 0) = ascii(%s)",
        (consumer.slot, consumer.env["CDC_PUBLICATION"], tag),
    ).fetchall()
    return int(count)


def test_message_the_decoder_cannot_read_stops_with_a_hint_on_every_run(consumer_over) -> None:
    """A pgoutput message that cannot be decoded: exit 2 with a hint, each run, slot kept."""
    # GIVEN an outbox event and, in the same commit, a logical message whose prefix is not
    # UTF-8 ("cdc" then 0xff), in a SQL_ASCII database
    consumer, url = consumer_over("SQL_ASCII")
    with psycopg.connect(url) as conn:
        _insert_event(conn, "'probe'", "'{}'")
        conn.execute(
            "SELECT pg_logical_emit_message(true,"
            " convert_from('\\x636463ff'::bytea, 'SQL_ASCII'), 'x')"
        )
    # WHEN the consumer runs, twice (as a supervisor restarts it)
    runs = [consumer.cli("run") for _ in range(2)]
    # THEN each run stops with exit code 2 and an operator hint, not a traceback
    for run in runs:
        assert run.returncode == 2, run.stderr
        assert "Traceback" not in run.stderr
        [stopped] = _log_lines(run.stderr, "pipeline stopped")
        assert stopped["kind"] == "undecodable_source"
        assert "invalid UTF-8" in stopped["error"]
        assert f"pg_logical_slot_peek_binary_changes('{consumer.slot}'" in stopped["hint"]
    # AND the slot was confirmed past neither the message nor the event before it (peeked
    # without conversion: asked for UTF-8, the server would refuse to send the message)
    with psycopg.connect(url, autocommit=True, client_encoding="SQL_ASCII") as conn:
        assert (_replayable(conn, consumer, "I"), _replayable(conn, consumer, "M")) == (1, 1)


def test_row_whose_text_is_not_utf8_is_dead_lettered_with_its_bytes_escaped(
    consumer_over, clickhouse_server
) -> None:
    """Text that is not UTF-8 in an outbox row: that event is dead-lettered, the rest arrive."""
    # GIVEN a consumer over a SQL_ASCII database
    consumer, url = consumer_over("SQL_ASCII")
    consumer.start()
    # WHEN one transaction holds good events, one whose type ends in byte 0xff and one whose
    # context holds byte 0xfe
    bad_type = "convert_from('\\x626164ff'::bytea, 'SQL_ASCII')"
    bad_context = "('{\"k\": \"' || convert_from('\\x63fe'::bytea, 'SQL_ASCII') || '\"}')::jsonb"
    with psycopg.connect(url) as conn:
        good = [_insert_event(conn, "'good'", "'{\"n\": 1}'")]
        bad = [_insert_event(conn, bad_type, "'{}'"), _insert_event(conn, "'good'", bad_context)]
        good.append(_insert_event(conn, "'good'", "'{\"n\": 2}'"))
    with psycopg.connect(url, autocommit=True) as conn:
        consumer.wait_confirmed(current_wal_lsn(conn))
    assert consumer.stop() == 0
    # THEN the good events are in event_log, the others in the dead-letter table with their
    # bytes escaped (0xff as the text \xff) and the column named
    quoted = ",".join(f"'{event_id}'" for event_id in good + bad)
    delivered = clickhouse_select(
        clickhouse_server.url,
        f"SELECT toString(event_id) FROM event_log WHERE event_id IN ({quoted})",
    )
    assert sorted(row[0] for row in delivered) == sorted(good)
    dead = clickhouse_select(
        clickhouse_server.url,
        "SELECT event_id, JSONExtractString(row, 'event_type'),"
        " JSONExtractString(row, 'event_context'), error FROM event_log_dead_letter"
        f" WHERE event_id IN ({quoted}) ORDER BY source_seq",
    )
    assert [row[:3] for row in dead] == [
        [bad[0], "bad\\xff", "{}"],
        [bad[1], "good", '{"k": "c\\xfe"}'],
    ]
    assert "event_type is not valid UTF-8" in dead[0][3]
    assert "event_context is not valid UTF-8" in dead[1][3]
    assert len(_log_lines(consumer.log_text(), "event dead-lettered")) == 2
