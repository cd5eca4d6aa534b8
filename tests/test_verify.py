"""`python -m cdc_consumer verify`: the outbox against event_log and the dead-letter table."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from tests.support.fix_clickhouse import clickhouse_command, clickhouse_select
from tests.support.fix_consumer import Consumer, current_wal_lsn, publish_probes

pytestmark = pytest.mark.e2e


@pytest.fixture
def own_database(make_database: Callable[..., str]) -> str:
    """A database of the test's own: verify and backfill judge every outbox row of their window,
    so other tests' events must not be in reach."""
    return make_database()


@pytest.fixture
def pg_conn(own_database: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(own_database, autocommit=True) as conn:
        yield conn


@pytest.fixture
def make_consumer(
    own_database: str, make_consumer: Callable[..., Consumer]
) -> Callable[..., Consumer]:
    """Consumers over this test's own database (set up after it, so dropped before it)."""

    def make(clickhouse_url: str, **overrides: str) -> Consumer:
        return make_consumer(clickhouse_url, database_url=own_database, **overrides)

    return make


def _verify(consumer: Consumer, since: Any, *args: str) -> tuple[int, dict[str, Any]]:
    """Run `verify --since since --json`; its exit code and report."""
    result = consumer.cli("verify", "--since", since.isoformat(), "--json", *args)
    assert result.returncode in {0, 1}, result.stderr
    return result.returncode, json.loads(result.stdout)


def _now(pg_conn) -> Any:
    return pg_conn.execute("SELECT clock_timestamp()").fetchone()[0]


def _ship(consumer: Consumer, pg_conn, count: int, environment: str) -> list[str]:
    """Publish `count` events in one transaction and wait until the slot is confirmed past them."""
    ids = publish_probes(pg_conn, count, environment)
    consumer.wait_confirmed(current_wal_lsn(pg_conn))
    return ids


def _streaming_from_now(make_consumer, clickhouse_url: str, pg_conn) -> tuple[Consumer, Any]:
    """A migrated consumer, streaming, and the moment its window starts (before any event)."""
    consumer = make_consumer(clickhouse_url)
    consumer.migrate()
    since = _now(pg_conn)
    consumer.start()
    return consumer, since


def _publish_poison(pg_conn) -> str:
    """One event whose context ClickHouse's JSON type refuses ("Duplicate path found")."""
    [[event_id]] = pg_conn.execute(
        "INSERT INTO event_outbox (event_id, event_type, event_date_time, environment,"
        " event_context, metadata_version) VALUES (gen_random_uuid(), 'probe', clock_timestamp(),"
        ' \'poison\', \'{"a.b": 1, "a": {"b": 2}}\'::jsonb, 1) RETURNING event_id::text'
    ).fetchall()
    return str(event_id)


def test_whole_pipeline_is_verified_whole(make_consumer, clickhouse_server, pg_conn):
    """Every event of the window delivered once or dead-lettered: exit 0, each one counted,
    and events created before the window are not judged."""
    # GIVEN events shipped before the window, then 30 good events and a poison one in it
    consumer = make_consumer(clickhouse_server.url)
    consumer.migrate()
    consumer.start()
    _ship(consumer, pg_conn, 7, "before-window")
    since = _now(pg_conn)
    _ship(consumer, pg_conn, 30, "in-window")
    before_poison = _now(pg_conn)
    _publish_poison(pg_conn)
    consumer.wait_confirmed(current_wal_lsn(pg_conn))
    assert consumer.stop() == 0
    # WHEN the operator verifies the window
    code, report = _verify(consumer, since)
    # THEN it is whole: 30 delivered once, the poison event accounted for as dead-lettered
    assert code == 0, report
    assert (report["checked"], report["delivered"], report["dead_lettered"]) == (31, 30, 1)
    assert (report["missing_count"], report["doubled_count"], report["in_flight"]) == (0, 0, 0)
    assert report["whole"] is True
    # AND --until ends the window: the poison event, created after it, is not judged
    code, report = _verify(consumer, since, "--until", before_poison.isoformat())
    assert (code, report["checked"], report["dead_lettered"]) == (0, 30, 0)
    # AND the summary for a person says so
    text = consumer.cli("verify", "--since", since.isoformat())
    assert text.returncode == 0, text.stderr
    assert "whole: every shipped event" in text.stdout


def test_events_in_flight_or_pruned_are_neither_missing_nor_doubled(
    make_consumer, clickhouse_server, pg_conn
):
    """Rows committed after the newest shipped commit are in flight, not missing; rows pruned
    from the outbox are not judged; the rest of the window still is."""
    # GIVEN 20 events shipped, then the consumer stopped and 5 more published
    consumer, since = _streaming_from_now(make_consumer, clickhouse_server.url, pg_conn)
    shipped = _ship(consumer, pg_conn, 20, "shipped")
    assert consumer.stop() == 0
    publish_probes(pg_conn, 5, "not-yet-shipped")
    # AND 4 shipped rows pruned from the outbox, as outbox_prune deletes them
    pg_conn.execute("DELETE FROM event_outbox WHERE event_id = ANY(%s::uuid[])", (shipped[:4],))
    # WHEN the operator verifies the window
    code, report = _verify(consumer, since)
    # THEN the 16 shipped rows the outbox holds are checked, the 5 others are in flight
    assert code == 0, report
    assert (report["checked"], report["delivered"], report["in_flight"]) == (16, 16, 5)
    assert report["missing_count"] == 0
    # AND once the consumer ships them they are judged, and whole
    consumer.start()
    consumer.wait_confirmed(current_wal_lsn(pg_conn))
    assert consumer.stop() == 0
    code, report = _verify(consumer, since)
    assert (code, report["checked"], report["in_flight"]) == (0, 21, 0)


def test_events_lost_from_clickhouse_are_listed_missing_and_backfill_repairs_them(
    merges_stopped, make_consumer, clickhouse_server, pg_conn
):
    """A part ClickHouse acknowledged is lost (as an OS crash loses an unsynced part): its
    events are listed missing, exit 1; the documented backfill re-ships them; verify exits 0."""
    # GIVEN two batches shipped, each its own part (merges stopped)
    url = clickhouse_server.url
    consumer, since = _streaming_from_now(make_consumer, url, pg_conn)
    kept = _ship(consumer, pg_conn, 10, "kept")
    lost = _ship(consumer, pg_conn, 10, "lost")
    assert consumer.stop() == 0
    # WHEN the part holding the second batch disappears
    quoted = ",".join(f"'{event_id}'" for event_id in lost)
    [[part, rows]] = clickhouse_select(
        url, f"SELECT _part, count() FROM event_log WHERE event_id IN ({quoted}) GROUP BY _part"
    )
    [[in_part]] = clickhouse_select(url, f"SELECT count() FROM event_log WHERE _part = '{part}'")
    assert int(rows) == int(in_part) == 10  # the part holds this batch and nothing else
    clickhouse_command(url, f"ALTER TABLE event_log DROP PART '{part}'")
    # THEN verify lists exactly those events missing and exits 1
    code, report = _verify(consumer, since)
    assert code == 1, report
    assert {event["event_id"] for event in report["missing"]} == set(lost)
    assert (report["missing_count"], report["delivered"], report["doubled_count"]) == (10, 10, 0)
    text = consumer.cli("verify", "--since", since.isoformat())
    assert text.returncode == 1
    assert all(event_id in text.stdout for event_id in lost)
    assert not any(event_id in text.stdout for event_id in kept)
    # AND the repair in docs/architecture.md (stop, drop the slot, backfill) makes it whole
    pg_conn.execute("SELECT pg_drop_replication_slot(%s)", (consumer.slot,))
    repair = consumer.cli("backfill", "--since", report["earliest_missing_created_at"])
    assert repair.returncode == 0, repair.stderr
    assert json.loads(repair.stdout)["shipped"] == 10
    code, report = _verify(consumer, since)
    assert (code, report["checked"], report["delivered"], report["missing_count"]) == (0, 20, 20, 0)


def test_event_written_twice_as_two_parts_is_listed_doubled(
    merges_stopped, make_consumer, clickhouse_server, pg_conn
):
    """One event twice in event_log, in two parts a merge has not folded (FINAL would hide
    it): verify counts physical rows, lists it doubled and exits 1."""
    # GIVEN 10 events shipped
    url = clickhouse_server.url
    consumer, since = _streaming_from_now(make_consumer, url, pg_conn)
    ids = _ship(consumer, pg_conn, 10, "doubled")
    assert consumer.stop() == 0
    # WHEN one of them is written again, as a second part
    twice = ids[3]
    clickhouse_command(
        url, f"INSERT INTO event_log SELECT * FROM event_log WHERE event_id = '{twice}'"
    )
    [[raw, final]] = clickhouse_select(
        url,
        f"SELECT (SELECT count() FROM event_log WHERE event_id = '{twice}'),"
        f" (SELECT count() FROM event_log FINAL WHERE event_id = '{twice}')",
    )
    assert (int(raw), int(final)) == (2, 1)
    # THEN verify lists it doubled with its two rows, and exits 1
    code, report = _verify(consumer, since)
    assert code == 1, report
    assert report["doubled"] == [{"event_id": twice, "rows": 2}]
    assert (report["checked"], report["doubled_count"], report["missing_count"]) == (10, 1, 0)


def test_verify_refuses_a_window_it_cannot_judge(make_consumer, clickhouse_server):
    """No --since, an --until before it, a bad variable or a database it cannot read: exit 2,
    never the 1 that means events are missing or doubled."""
    consumer = make_consumer(clickhouse_server.url)
    consumer.migrate()
    no_since = consumer.cli("verify")
    assert (no_since.returncode, "verify needs --since" in no_since.stderr) == (2, True)
    backwards = consumer.cli(
        "verify", "--since", "2026-12-01T10:00:00+00:00", "--until", "2026-12-01T09:00:00+00:00"
    )
    assert (backwards.returncode, "window is empty" in backwards.stderr) == (2, True)
    bad = consumer.cli(
        "verify",
        "--since",
        "2026-12-01T10:00:00+00:00",
        env={**consumer.env, "CDC_BATCH_MAX_ROWS": "lots"},
    )
    assert bad.returncode == 2
    assert bad.stderr.startswith("configuration error: CDC_BATCH_MAX_ROWS")
    elsewhere = urlsplit(consumer.env["DATABASE_URL"])._replace(path="/no_such_database")
    unreachable = consumer.cli(
        "verify",
        "--since",
        "2026-12-01T10:00:00+00:00",
        env={**consumer.env, "DATABASE_URL": urlunsplit(elsewhere)},
    )
    assert (unreachable.returncode, "no_such_database" in unreachable.stderr) == (2, True)
