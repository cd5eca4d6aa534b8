"""End to end: Django service → event_outbox → WAL → consumer → ClickHouse, on real engines.

Each test runs the real consumer process against the session's PostgreSQL and either the
ClickHouse HTTP interface (clickhouse-connect, the production transport) or chDB in process.
"""

from __future__ import annotations

import signal
import uuid
from typing import Any

import orjson
import pytest
from django.db import transaction

from cdc_consumer.clickhouse import connect
from tests.support.fix_clickhouse import clickhouse_select
from tests.support.fix_consumer import Consumer, current_wal_lsn, status_received_after, wait_for
from web.accounts.services import user_create

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


@pytest.fixture(params=["http", "chdb"])
def clickhouse_url(request: pytest.FixtureRequest, tmp_path) -> str:
    """The production HTTP transport, or the embedded engine in the consumer's process."""
    if request.param == "http":
        return str(request.getfixturevalue("clickhouse_server").url)
    return f"chdb://{tmp_path}/clickhouse"


def _create_users(count: int, tag: str) -> list[str]:
    emails = [f"{tag}-{n}-{uuid.uuid4().hex[:6]}@example.test" for n in range(count)]
    for email in emails:
        user_create(email=email, first_name="Zoë", last_name="Ñandú 🦤")
    return emails


def _outbox_ids(pg_conn, emails: list[str]) -> set[str]:
    rows = pg_conn.execute(
        "SELECT event_id::text FROM event_outbox WHERE event_context->>'email' = ANY(%s)",
        (emails,),
    ).fetchall()
    return {row[0] for row in rows}


def _event_log(clickhouse_url: str, event_ids: set[str]) -> list[list[Any]]:
    """Rows of event_log for these events (no FINAL: raw duplicates would show)."""
    quoted = ",".join(f"'{event_id}'" for event_id in sorted(event_ids)) or "''"
    return clickhouse_select(
        clickhouse_url,
        "SELECT toString(event_id), event_type, environment, event_context_raw,"
        " toJSONString(event_context), metadata_version, source_lsn"
        f" FROM event_log WHERE event_id IN ({quoted}) ORDER BY event_id",
    )


def _create_then_fail(email: str) -> None:
    """A request whose business step fails after the user (and its event) were written."""

    class BusinessStepError(Exception):
        pass

    try:
        with transaction.atomic():
            user_create(email=email, first_name="A", last_name="B")
            raise BusinessStepError
    except BusinessStepError:
        return
    pytest.fail("the transaction should have rolled back")


def _run_until_caught_up(consumer: Consumer, pg_conn) -> int:
    consumer.start()
    consumer.wait_confirmed(current_wal_lsn(pg_conn))
    return consumer.stop()


def test_committed_user_creation_arrives(make_consumer, clickhouse_url, pg_conn):
    """A committed user creation lands in event_log with its type, environment, context, version."""
    # GIVEN a migrated consumer
    consumer = make_consumer(clickhouse_url)
    consumer.migrate()
    # WHEN a user is created through the service and the consumer catches up
    emails = _create_users(1, "arrives")
    assert _run_until_caught_up(consumer, pg_conn) == 0
    # THEN event_log holds exactly that event, its context byte-for-byte as PostgreSQL stored it
    stored = pg_conn.execute(
        "SELECT event_id::text, event_context::text, environment FROM event_outbox"
        " WHERE event_context->>'email' = %s",
        (emails[0],),
    ).fetchone()
    rows = _event_log(clickhouse_url, {stored[0]})
    assert len(rows) == 1
    event_id, event_type, environment, raw, queryable, version, source_lsn = rows[0]
    assert (event_id, event_type, environment, version) == (stored[0], "user_created", "test", 1)
    assert raw == stored[1]
    context = {"email": emails[0], "first_name": "Zoë", "last_name": "Ñandú 🦤"}
    assert orjson.loads(raw) == context
    assert orjson.loads(queryable) == context
    assert source_lsn > 0


def test_rolled_back_creation_never_arrives(make_consumer, clickhouse_url, pg_conn):
    """An event published in a transaction that rolls back never reaches ClickHouse."""
    consumer = make_consumer(clickhouse_url)
    consumer.migrate()
    doomed = f"doomed-{uuid.uuid4().hex[:6]}@example.test"
    _create_then_fail(doomed)
    kept = _create_users(1, "kept")
    assert _run_until_caught_up(consumer, pg_conn) == 0
    assert _outbox_ids(pg_conn, [doomed]) == set()
    kept_ids = _outbox_ids(pg_conn, kept)
    assert len(_event_log(clickhouse_url, kept_ids)) == 1
    everything = connect(clickhouse_url)
    try:
        leaked = everything.select(
            f"SELECT count() FROM event_log WHERE event_context_raw LIKE '%{doomed}%'"
        )
    finally:
        everything.close()
    assert leaked == [[0]]


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGKILL])
def test_restart_loses_nothing_doubles_nothing(make_consumer, clickhouse_url, pg_conn, stop_signal):
    """Stopped (gracefully or killed) and restarted, the consumer delivers every event once."""
    consumer = make_consumer(clickhouse_url, CDC_BATCH_MAX_ROWS="7")
    consumer.migrate()
    consumer.start()
    # WHEN events are published while it runs, it is stopped mid-stream, more are published
    first = _create_users(40, "before")
    consumer.stop(stop_signal)
    second = _create_users(25, "while-down")
    # THEN after a restart everything published is there exactly once, without FINAL
    assert _run_until_caught_up(consumer, pg_conn) == 0
    ids = _outbox_ids(pg_conn, first + second)
    rows = _event_log(clickhouse_url, ids)
    assert len(ids) == 65
    assert sorted(row[0] for row in rows) == sorted(ids)


def test_confirmed_lsn_never_passes_an_event_not_in_clickhouse(
    make_consumer, clickhouse_faults, pg_conn
):
    """While the insert carrying an event is held back, the slot is not confirmed past it."""
    # GIVEN a running consumer and a ClickHouse that holds every insert
    clickhouse_server = clickhouse_faults
    consumer = make_consumer(clickhouse_server.url)
    consumer.migrate()
    consumer.start()
    clickhouse_server.hold_inserts()
    try:
        # WHEN events are published and their insert is in flight for several status intervals
        emails = _create_users(3, "held")
        after = current_wal_lsn(pg_conn)
        clickhouse_server.wait_for_held_inserts()
        held_since = pg_conn.execute("SELECT clock_timestamp()").fetchone()[0]
        wait_for(
            lambda: status_received_after(pg_conn, consumer.slot, held_since, seconds=2.5),
            what="status updates while the insert is held",
        )
        # THEN the walsender heard from the consumer, but the slot stays behind the events
        assert consumer.confirmed_lsn() < after
        assert _event_log(clickhouse_server.url, _outbox_ids(pg_conn, emails)) == []
    finally:
        clickhouse_server.release_inserts()
    consumer.wait_confirmed(after)
    assert len(_event_log(clickhouse_server.url, _outbox_ids(pg_conn, emails))) == 3
    assert consumer.stop() == 0


def test_changes_to_ignored_tables_are_skipped(make_consumer, clickhouse_server, pg_conn):
    """Inserts into a table of the publication listed in CDC_IGNORED_TABLES are skipped and the
    stream moves on (unlisted, it stops the consumer: test_publication_relations.py)."""
    consumer = make_consumer(clickhouse_server.url, CDC_IGNORED_TABLES="public.unrelated")
    consumer.migrate()
    pg_conn.execute("CREATE TABLE IF NOT EXISTS unrelated (id int, note text)")
    pg_conn.execute(f"ALTER PUBLICATION {consumer.env['CDC_PUBLICATION']} ADD TABLE unrelated")
    consumer.start()
    pg_conn.execute("INSERT INTO unrelated VALUES (1, 'not an event')")
    emails = _create_users(2, "after-unrelated")
    consumer.wait_confirmed(current_wal_lsn(pg_conn))
    assert consumer.stop() == 0
    assert len(_event_log(clickhouse_server.url, _outbox_ids(pg_conn, emails))) == 2


def test_position_comes_from_the_commit(make_consumer, clickhouse_server, pg_conn):
    """Events of one transaction share its commit LSN and keep their order in source_seq."""
    consumer = make_consumer(clickhouse_server.url)
    consumer.migrate()
    with transaction.atomic():
        emails = _create_users(3, "one-tx")
    assert _run_until_caught_up(consumer, pg_conn) == 0
    transport = connect(clickhouse_server.url)
    try:
        ids = ",".join(f"'{i}'" for i in _outbox_ids(pg_conn, emails))
        rows = transport.select(
            f"SELECT source_lsn, source_seq FROM event_log WHERE event_id IN ({ids})"
            " ORDER BY source_seq"
        )
    finally:
        transport.close()
    assert len({row[0] for row in rows}) == 1
    assert [row[1] for row in rows] == [0, 1, 2]


def test_idle_slot_follows_other_wal(make_consumer, clickhouse_server, pg_conn):
    """With no outbox traffic but WAL from other tables, the confirmed position keeps up."""
    consumer = make_consumer(clickhouse_server.url)
    consumer.migrate()
    consumer.start()
    pg_conn.execute("CREATE TABLE IF NOT EXISTS busy_elsewhere (id bigint, payload text)")
    for _ in range(3):
        pg_conn.execute(
            "INSERT INTO busy_elsewhere SELECT g, repeat('x', 200) FROM generate_series(1, 2000) g"
        )
        consumer.wait_confirmed(current_wal_lsn(pg_conn), timeout=15)
    assert consumer.stop() == 0
