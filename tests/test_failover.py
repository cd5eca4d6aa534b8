"""PostgreSQL failover with a real standby: pg_basebackup, slot sync, promotion (timeline 2).

After an asynchronous failover the new primary reuses LSNs that ClickHouse may already hold
for events of the old primary: only positions of the new primary's own WAL history may be
skipped, and a slot that cannot resume the source is refused with a pointer to the backfill.
"""

from __future__ import annotations

import json
import re
import signal
import uuid

import psycopg
import pytest

from cdc_consumer import pgoutput
from tests.support.fix_clickhouse import clickhouse_command, clickhouse_select
from tests.support.fix_consumer import Consumer, current_wal_lsn, publish_probes

pytestmark = pytest.mark.e2e


def _copies(url: str, event_ids: list[str]) -> dict[str, int]:
    """How many rows event_log holds of each event (merges are not awaited: FINAL not used)."""
    quoted = ",".join(f"'{event_id}'" for event_id in event_ids)
    rows = clickhouse_select(
        url,
        f"SELECT toString(event_id), count() FROM event_log WHERE event_id IN ({quoted})"
        " GROUP BY event_id",
    )
    found = {str(event_id): int(n) for event_id, n in rows}
    return {event_id: found.get(event_id, 0) for event_id in event_ids}


def current_wal_lsn_of(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        return current_wal_lsn(conn)


def _publish(url: str, count: int, environment: str) -> list[str]:
    with psycopg.connect(url, autocommit=True) as conn:
        return publish_probes(conn, count, environment)


def _last_commit_lsn(url: str, consumer: Consumer) -> int:
    """The commit LSN of the newest transaction the (inactive) slot would replay, peeked."""
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT data FROM pg_logical_slot_peek_binary_changes(%s, NULL, NULL,"
            " 'proto_version', '1', 'publication_names', %s)",
            (consumer.slot, consumer.env["CDC_PUBLICATION"]),
        ).fetchall()
    begins = [pgoutput.decode(memoryview(row[0])) for row in rows if bytes(row[0][:1]) == b"B"]
    return max(begin.final_lsn for begin in begins if isinstance(begin, pgoutput.Begin))


def _plant_rows_of_the_old_primary(url: str, source: str, lsn: int, count: int) -> None:
    """Rows as an older consumer (no timeline column yet) shipped them from the old primary at
    `lsn`, which the new timeline reuses for its own transaction."""
    clickhouse_command(
        url,
        "INSERT INTO event_log (event_id, event_type, event_date_time, environment,"
        " event_context, event_context_raw, metadata_version, source, source_lsn, source_seq)"
        " SELECT generateUUIDv4(number), 'probe', now64(6), 'lost-in-failover', '{}', '{}', 1,"
        f" '{source}', {lsn}, number FROM numbers({count})",
    )


def _timeline(url: str, source: str) -> int:
    ((timeline,),) = clickhouse_select(
        url, f"SELECT timeline FROM cdc_sources FINAL WHERE source = '{source}'"
    )
    return int(timeline)


def test_failover_slot_resumes_skipping_only_positions_of_the_new_history(
    primary_and_standby, make_consumer, clickhouse_server
):
    """A failover slot survives an asynchronous failover; on the new timeline the consumer
    skips the positions both histories share (no duplicates) but not those the old primary
    shipped past the switchpoint, which the new primary reuses (nothing lost)."""
    primary, standby = primary_and_standby
    environment = f"failover-{uuid.uuid4().hex[:12]}"
    consumer = make_consumer(
        clickhouse_server.url, database_url=primary.url, CDC_SLOT_FAILOVER="true"
    )
    consumer.migrate()  # outbox, publication, slot
    consumer.start()
    # GIVEN a failover slot synced to the standby after the first events
    before = _publish(primary.url, 3, environment)
    consumer.wait_confirmed(current_wal_lsn_of(primary.url))
    standby.sync_slot(primary.url, consumer.slot, at_least=consumer.confirmed_lsn())
    # AND events shipped after that sync, which the standby replays (the synced slot is behind
    # them, so the new primary replays them to the consumer)
    shared = _publish(primary.url, 3, environment)
    consumer.wait_confirmed(current_wal_lsn_of(primary.url))
    standby.wait_replayed(primary.url)
    # AND events the old primary shipped while the standby was down (asynchronous replication,
    # synchronized_standby_slots empty): ClickHouse has them, the new primary never will
    standby.stop()
    lost = _publish(primary.url, 3, environment)
    consumer.wait_confirmed(current_wal_lsn_of(primary.url))
    assert consumer.stop() == 0
    primary.stop("immediate")
    # WHEN the standby is promoted (timeline 2) and events are published on it
    standby.start()
    standby.promote()
    consumer.point_at(standby.url)
    fresh = _publish(standby.url, 3, environment)
    # AND ClickHouse holds rows the old primary shipped at the LSN the new timeline gave them
    _plant_rows_of_the_old_primary(
        clickhouse_server.url, consumer.slot, _last_commit_lsn(standby.url, consumer), 3
    )
    consumer.start()
    consumer.wait_confirmed(current_wal_lsn_of(standby.url))
    assert consumer.stop() == 0
    # THEN every event is in event_log once: the shared ones were skipped, not doubled, and the
    # new ones were shipped although their positions were taken
    copies = _copies(clickhouse_server.url, before + shared + lost + fresh)
    assert copies == dict.fromkeys(before + shared + lost + fresh, 1)
    streaming = [e for e in consumer.log_events() if e["event"] == "streaming"]
    assert streaming[-1]["timeline"] == 2
    assert streaming[-1]["stored_rows"] >= len(shared)
    untrusted = [
        e
        for e in consumer.log_events()
        if e["event"] == "stored positions of another wal history are not skipped"
    ]
    assert [e["untrusted_rows"] for e in untrusted] == [len(lost) + 3]
    assert _timeline(clickhouse_server.url, consumer.slot) == 2


def test_slot_created_after_a_failover_is_refused_until_backfilled(
    primary_and_standby, make_consumer, clickhouse_server
):
    """Without failover slots the promoted standby has no slot: `run` and `migrate` refuse
    (exit 2, naming the backfill from the last shipped commit, which cdc_progress brought
    over), a slot created by hand starts after the switchpoint, which `run` refuses too rather
    than skip what was committed meanwhile; the backfill then ships exactly what ClickHouse
    lacks."""
    primary, standby = primary_and_standby
    environment = f"failover-{uuid.uuid4().hex[:12]}"
    consumer = make_consumer(clickhouse_server.url, database_url=primary.url)
    consumer.migrate()  # outbox, publication, slot
    consumer.start()
    # GIVEN events shipped, and events committed while the consumer was down, all replicated
    shipped = _publish(primary.url, 3, environment)
    consumer.wait_confirmed(current_wal_lsn_of(primary.url))
    assert consumer.stop(signal.SIGKILL) == -signal.SIGKILL
    unshipped = _publish(primary.url, 3, environment)
    standby.wait_replayed(primary.url)
    # WHEN the primary dies, the standby is promoted, and events are published before any slot
    # exists there
    primary.stop("immediate")
    standby.promote()
    consumer.point_at(standby.url)
    before_slot = _publish(standby.url, 3, environment)
    missing = consumer.cli("run", timeout=60)
    # THEN the consumer finds no slot, and says what to do
    assert missing.returncode == 2, missing.stderr
    assert f"replication slot {consumer.slot} does not exist" in missing.stderr
    assert "backfill --since" in missing.stderr
    # AND `migrate` will not create one either: it names the backfill, and makes no slot
    refused = consumer.cli("migrate")
    assert refused.returncode == 2, refused.stderr
    hinted = re.search(
        r"backfill --since ([^`\s]+)", json.loads(refused.stderr.splitlines()[-1])["hint"]
    )
    assert hinted is not None, refused.stderr
    assert consumer.slot_row() is None
    # AND a slot created by hand anyway starts past the switchpoint, which `run` refuses
    with psycopg.connect(standby.url, autocommit=True) as conn:
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (consumer.slot,))
    result = consumer.cli("run", timeout=60)
    assert result.returncode == 2, result.stderr
    assert "past that point" in result.stderr
    assert "backfill --since" in result.stderr
    assert _copies(clickhouse_server.url, unshipped + before_slot) == dict.fromkeys(
        unshipped + before_slot, 0
    )
    # AND following the hints (drop that slot, backfill from the time migrate named) delivers
    # everything once
    with psycopg.connect(standby.url, autocommit=True) as conn:
        conn.execute("SELECT pg_drop_replication_slot(%s)", (consumer.slot,))
    backfill = consumer.cli("backfill", "--since", hinted[1])
    assert backfill.returncode == 0, backfill.stderr
    consumer.start()
    after = _publish(standby.url, 3, environment)
    consumer.wait_confirmed(current_wal_lsn_of(standby.url))
    assert consumer.stop() == 0
    everything = shipped + unshipped + before_slot + after
    assert _copies(clickhouse_server.url, everything) == dict.fromkeys(everything, 1)
    assert _timeline(clickhouse_server.url, consumer.slot) == 2
