"""Outboxes in databases that are not UTF-8.

pgoutput sends text in the replication connection's client_encoding, which defaults to the
database's own. A LATIN1 (or any other convertible) database is converted by the server; a
SQL_ASCII database stores whatever bytes it was given and sends them on unchanged, which is how
bytes that are not UTF-8 reach the consumer from a real server (checked on PostgreSQL 18).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit

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


@pytest.fixture
def make_database(postgres_url: str) -> Iterator[Callable[[str], str]]:
    """Create databases of a given encoding on the session's server; dropped afterwards."""
    names: list[str] = []

    def make(encoding: str) -> str:
        name = f"enc_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(
                f"CREATE DATABASE {name} ENCODING '{encoding}' TEMPLATE template0"
                " LC_COLLATE 'C' LC_CTYPE 'C'"
            )
            if encoding == "SQL_ASCII":
                # psycopg returns SQL_ASCII text as bytes, which the consumer's SQL connections
                # (migrations, progress) do not expect; the replication connection chooses
                # its own encoding, so this changes nothing about what the WAL delivers.
                conn.execute(f"ALTER DATABASE {name} SET client_encoding = 'UTF8'")
        names.append(name)
        return urlsplit(postgres_url)._replace(path=f"/{name}").geturl()

    yield make
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        for name in names:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def consumer_over(
    make_database: Callable[[str], str], make_consumer, clickhouse_server
) -> Callable[[str], tuple[Consumer, str]]:
    """A migrated, stopped consumer over a fresh database of an encoding, and that database's
    URL. make_database is set up before make_consumer, so slots are dropped before databases."""

    def make(encoding: str) -> tuple[Consumer, str]:
        url = make_database(encoding)
        consumer = make_consumer(clickhouse_server.url, database_url=url)
        consumer.migrate()
        return consumer, url

    return make


def test_latin1_text_arrives_converted_to_utf8(consumer_over, clickhouse_server) -> None:
    """An outbox in a LATIN1 database: accented text lands in event_log as the same text."""
    # GIVEN a consumer over a LATIN1 database
    consumer, url = consumer_over("LATIN1")
    consumer.start()
    # WHEN an event with accented type and context is published there
    with psycopg.connect(url, autocommit=True) as conn:
        [[event_id]] = conn.execute(
            _OUTBOX_INSERT.format(event_type="'café_noted'", context='\'{"city": "Zürich"}\'')
        ).fetchall()
        consumer.wait_confirmed(current_wal_lsn(conn))
    assert consumer.stop() == 0
    # THEN event_log holds the text as published
    rows = clickhouse_select(
        clickhouse_server.url,
        "SELECT event_type, event_context_raw, toString(event_context.city) FROM event_log"
        f" WHERE event_id = '{event_id}'",
    )
    assert rows == [["café_noted", '{"city": "Zürich"}', "Zürich"]]
