"""cdc_consumer.provisioning: the slot `migrate` creates (or refuses to recreate), and
CDC_SLOT_FAILOVER."""

from __future__ import annotations

import json
import uuid
from datetime import UTC

import psycopg
import pytest

from cdc_consumer import migrations
from cdc_consumer.errors import ErrorKind, PipelineError
from cdc_consumer.provisioning import check_failover_supported, ensure_slot
from tests.support.fix_consumer import publish_probes


def test_failover_on_a_server_before_17_is_a_configuration_error():
    """PostgreSQL 16 has no failover slots: asking for one is refused, naming the version."""
    with pytest.raises(PipelineError) as caught:
        check_failover_supported(160004, failover=True)
    assert caught.value.kind is ErrorKind.CONFIGURATION
    assert str(caught.value) == (
        "CDC_SLOT_FAILOVER needs PostgreSQL 17 or later; this server is 16"
    )
    check_failover_supported(160004, failover=False)
    check_failover_supported(170000, failover=True)


def _slot_failover(pg_conn, slot: str) -> bool | None:
    row = pg_conn.execute(
        "SELECT failover FROM pg_replication_slots WHERE slot_name = %s", (slot,)
    ).fetchone()
    return None if row is None else bool(row[0])


@pytest.mark.e2e
def test_migrate_creates_a_failover_slot_when_asked(make_consumer, clickhouse_server, pg_conn):
    """With CDC_SLOT_FAILOVER=true, `migrate` creates the slot with failover on."""
    consumer = make_consumer(clickhouse_server.url, CDC_SLOT_FAILOVER="true")
    consumer.migrate()
    assert _slot_failover(pg_conn, consumer.slot) is True


@pytest.mark.e2e
def test_existing_slot_is_made_a_failover_slot_but_never_unmade(
    make_consumer, clickhouse_server, pg_conn
):
    """A slot made without failover is altered to failover when the setting asks; a failover
    slot met with the setting off stops `migrate` (exit 2) instead of turning failover off."""
    # GIVEN a slot created with the default setting
    consumer = make_consumer(clickhouse_server.url)
    consumer.migrate()
    assert _slot_failover(pg_conn, consumer.slot) is False
    # WHEN migrate runs with CDC_SLOT_FAILOVER=true
    consumer.env["CDC_SLOT_FAILOVER"] = "true"
    consumer.migrate()
    # THEN the same slot (same position) is now a failover slot
    assert _slot_failover(pg_conn, consumer.slot) is True
    # AND with the setting back off, migrate refuses and leaves the slot as it is
    del consumer.env["CDC_SLOT_FAILOVER"]
    result = consumer.cli("migrate")
    assert result.returncode == 2, result.stderr
    failure = json.loads(result.stderr.strip().splitlines()[-1])
    assert failure["error"] == (
        f"slot {consumer.slot} is a failover slot but CDC_SLOT_FAILOVER is false"
    )
    assert "ALTER_REPLICATION_SLOT" in failure["hint"]
    assert _slot_failover(pg_conn, consumer.slot) is True


@pytest.mark.e2e
def test_slot_held_by_a_consumer_is_not_altered_but_refused(
    make_consumer, clickhouse_server, pg_conn
):
    """Making a slot a failover slot while a consumer streams it stops `migrate` at once with
    the holder's PID, instead of waiting for the slot to be free (ALTER_REPLICATION_SLOT
    would)."""
    # GIVEN a consumer streaming a slot made without failover
    consumer = make_consumer(clickhouse_server.url)
    consumer.migrate()
    consumer.start()
    # WHEN migrate runs with CDC_SLOT_FAILOVER=true beside it
    result = consumer.cli("migrate", env={**consumer.env, "CDC_SLOT_FAILOVER": "true"}, timeout=30)
    # THEN it refuses, naming who holds the slot, and the slot is unchanged
    assert result.returncode == 2, result.stderr
    failure = json.loads(result.stderr.strip().splitlines()[-1])
    assert failure["error"] == (
        f"cannot make slot {consumer.slot} a failover slot: it is active for PID"
        f" {consumer.slot_pid()}"
    )
    assert _slot_failover(pg_conn, consumer.slot) is False
    assert consumer.stop() == 0


@pytest.mark.e2e
def test_slot_is_created_before_cdc_progress_exists_and_refused_once_it_has_a_row(
    make_database,
):
    """On a database without cdc_progress (before the first migrate creates it) the slot is
    created; once the table has a row for the slot, a missing slot is refused, and with no
    shipped commit recorded the hint backfills from the oldest outbox row."""
    url = make_database()
    slot = f"t{uuid.uuid4().hex[:10]}_slot"
    with psycopg.connect(url, autocommit=True) as conn:
        try:
            # GIVEN a database no migrate has run on: the slot is made
            ensure_slot(conn, slot, url=url)
            conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
            # WHEN the schema exists and cdc_progress has the slot's row, with no shipped commit
            migrations.migrate_postgres(conn, migrations.SQL_ROOT / "postgres")
            [oldest] = publish_probes(conn, 1, "provisioning-oldest")
            conn.execute(
                "INSERT INTO cdc_progress (slot, confirmed_lsn, confirmed_at, updated_at)"
                " VALUES (%s, '0/0', now(), now())",
                (slot,),
            )
            [[created_at]] = conn.execute(
                "SELECT created_at FROM event_outbox WHERE event_id = %s", (oldest,)
            ).fetchall()
            # THEN the slot is refused, naming the backfill from the oldest row and the way out
            with pytest.raises(PipelineError) as caught:
                ensure_slot(conn, slot, url=url)
            assert caught.value.kind is ErrorKind.CONFIGURATION
            assert "it recorded no shipped commit" in str(caught.value)
            assert (
                f"backfill --since {created_at.astimezone(UTC).isoformat()}`" in caught.value.hint
            )
            assert f"DELETE FROM cdc_progress WHERE slot = '{slot}';" in caught.value.hint
            # AND deleting the row, as the hint says, lets it be made
            conn.execute("DELETE FROM cdc_progress WHERE slot = %s", (slot,))
            ensure_slot(conn, slot, url=url)
        finally:  # a slot left behind would stop the database from being dropped
            conn.execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
                " WHERE slot_name = %s",
                (slot,),
            )
