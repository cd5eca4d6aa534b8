"""What the publication may hold: the outbox, and nothing the consumer would silently drop.

A table that is not the outbox in our publication (added by mistake, the outbox renamed, its
partitions published under their own names) stops the consumer with a configuration error
naming it, before the slot moves past its rows; a partitioned outbox publishes through its
root, so its events arrive as the outbox's.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

import psycopg
import pytest

from tests.support.fix_clickhouse import clickhouse_select
from tests.support.fix_consumer import (
    Consumer,
    create_partitioned_outbox,
    current_wal_lsn,
    publish_probes,
    wait_for,
)

pytestmark = [pytest.mark.e2e]


def _replayable_inserts(conn: psycopg.Connection[Any], consumer: Consumer) -> int:
    """Inserts (pgoutput 'I') the stopped slot would replay to its next consumer."""
    [[count]] = conn.execute(
        "SELECT count(*) FROM pg_logical_slot_peek_binary_changes(%s, NULL, NULL,"
        " 'proto_version', '1', 'publication_names', %s)"
        " WHERE get_byte(data, 0) = ascii('I')",
        (consumer.slot, consumer.env["CDC_PUBLICATION"]),
    ).fetchall()
    return int(count)


def _stopped_events(consumer: Consumer) -> list[dict[str, Any]]:
    return [e for e in consumer.log_events() if e.get("event") == "pipeline stopped"]


def test_table_added_to_the_publication_stops_the_consumer_before_its_rows(
    consumer_over, clickhouse_server
) -> None:
    """A second table in the publication: exit 2 naming it; its transaction stays in the slot."""
    # GIVEN a streaming consumer that has shipped one event
    consumer, url = consumer_over()
    consumer.start()
    with psycopg.connect(url, autocommit=True) as conn:
        shipped = publish_probes(conn, 1, "before")
        consumer.wait_confirmed(current_wal_lsn(conn))
        # WHEN another table joins the publication and a transaction writes it and the outbox
        conn.execute("CREATE TABLE audit_trail (id bigint PRIMARY KEY, note text)")
        conn.execute(f"ALTER PUBLICATION {consumer.env['CDC_PUBLICATION']} ADD TABLE audit_trail")
        with conn.transaction():
            conn.execute("INSERT INTO audit_trail VALUES (1, 'not an event')")
            held = publish_probes(conn, 1, "beside-the-other-table")
        # THEN the consumer stops by itself with exit 2, naming the table and what to do
        process = consumer.process
        assert process is not None
        wait_for(lambda: process.poll() is not None, timeout=30, what="consumer stopped")
        assert consumer.stop() == 2, consumer.log_text()
        [stopped] = _stopped_events(consumer)
        assert stopped["kind"] == "configuration"
        assert "public.audit_trail" in stopped["error"]
        assert "ALTER PUBLICATION" in stopped["hint"]
        # AND the slot stays before that transaction: both its inserts replay to the next run
        assert _replayable_inserts(conn, consumer) == 2

    # AND the outbox event in it was not shipped, the one before it was
    def landed() -> list[str]:
        rows = clickhouse_select(
            clickhouse_server.url,
            "SELECT toString(event_id) FROM event_log"
            f" WHERE event_id IN ('{shipped[0]}', '{held[0]}') ORDER BY source_lsn",
        )
        return [row[0] for row in rows]

    assert landed() == shipped
    # WHEN the operator takes the table out of the publication and tells the consumer its rows
    # (which the slot still replays) are not events
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"ALTER PUBLICATION {consumer.env['CDC_PUBLICATION']} DROP TABLE audit_trail")
        consumer.env["CDC_IGNORED_TABLES"] = "public.audit_trail"
        consumer.start()
        consumer.wait_confirmed(current_wal_lsn(conn))
    assert consumer.stop() == 0
    # THEN the held event arrives, once
    assert landed() == shipped + held


def test_partitioned_outbox_publishes_through_its_root(
    make_database, make_consumer, clickhouse_server
) -> None:
    """An outbox partitioned by month before `migrate`: its events arrive once each."""
    # GIVEN a database whose outbox is partitioned (created before the migrations, which
    # create it only if it does not exist)
    url = make_database()
    with psycopg.connect(url, autocommit=True) as conn:
        create_partitioned_outbox(
            conn,
            {
                "event_outbox_old": "FOR VALUES FROM (MINVALUE) TO ('2000-01-01')",
                "event_outbox_now": "FOR VALUES FROM ('2000-01-01') TO (MAXVALUE)",
            },
        )
    consumer = make_consumer(clickhouse_server.url, database_url=url)
    consumer.migrate()
    consumer.start()
    # WHEN events are published into it
    with psycopg.connect(url, autocommit=True) as conn:
        ids = publish_probes(conn, 5, "partitioned")
        consumer.wait_confirmed(current_wal_lsn(conn))
    assert consumer.stop() == 0
    # THEN each is in event_log once
    quoted = ",".join(f"'{event_id}'" for event_id in ids)
    [[rows, distinct]] = clickhouse_select(
        clickhouse_server.url,
        f"SELECT count(), uniqExact(event_id) FROM event_log WHERE event_id IN ({quoted})",
    )
    assert (rows, distinct) == (5, 5)


def test_concurrent_migrates_create_the_publication_and_slot_once(
    make_database, make_consumer, clickhouse_server
) -> None:
    """Two processes migrating one fresh database at once both succeed."""
    url = make_database()
    consumer = make_consumer(clickhouse_server.url, database_url=url)
    consumer.migrate()  # the schema first: the race under test is the publication's and slot's
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"DROP PUBLICATION {consumer.env['CDC_PUBLICATION']}")
        conn.execute("SELECT pg_drop_replication_slot(%s)", (consumer.slot,))
    # GIVEN the publication catalog locked, so both migrators queue at the same point
    with psycopg.connect(url) as blocker:
        blocker.execute("LOCK TABLE pg_catalog.pg_publication IN ACCESS EXCLUSIVE MODE")
        migrators = [
            subprocess.Popen(
                [sys.executable, "-m", "cdc_consumer", "migrate"],
                env=consumer.env,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(2)
        ]

        def both_waiting() -> bool:
            with psycopg.connect(url, autocommit=True) as watcher:
                [[waiting]] = watcher.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND wait_event_type = 'Lock' AND pid <> %s",
                    (blocker.info.backend_pid,),
                ).fetchall()
            return int(waiting) >= 2

        wait_for(both_waiting, what="both migrators waiting")
        time.sleep(0.2)
    # WHEN the lock is released
    # THEN both exit 0, and one publication and one slot exist
    errors = [m.communicate(timeout=60)[1] for m in migrators]
    assert [m.returncode for m in migrators] == [0, 0], json.dumps(errors)
    with psycopg.connect(url, autocommit=True) as conn:
        [[slots]] = conn.execute(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s", (consumer.slot,)
        ).fetchall()
    assert slots == 1
