"""The slot check (cdc_consumer.status), cdc_progress, and the `status` / `health` commands."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from cdc_consumer.status import Severity, SlotReport, SlotThresholds, classify
from tests.support.fix_consumer import (
    Consumer,
    current_wal_lsn,
    publish_probes,
    server_setting,
    wait_for,
)

THRESHOLDS = SlotThresholds(
    lag_warning_bytes=1000, lag_critical_bytes=5000, stall_warning_seconds=60,
    stall_critical_seconds=600,
)  # fmt: skip
HEALTHY = SlotReport(
    slot="s", exists=True, active=True, wal_status="reserved", lag_bytes=0,
    seconds_since_confirm=1.0,
)  # fmt: skip


@pytest.mark.parametrize(
    ("changes", "severity", "needle"),
    [
        ({}, Severity.OK, None),
        ({"exists": False}, Severity.CRITICAL, "slot missing"),
        ({"wal_status": "lost"}, Severity.CRITICAL, "lost"),
        ({"wal_status": "unreserved"}, Severity.CRITICAL, "unreserved"),
        ({"wal_status": "extended"}, Severity.WARNING, "extended"),
        ({"active": False}, Severity.WARNING, "no consumer"),
        ({"lag_bytes": 1000}, Severity.WARNING, "lag 1000 bytes"),
        ({"lag_bytes": 5000}, Severity.CRITICAL, "critical threshold 5000"),
        ({"lag_bytes": 10, "seconds_since_confirm": 61.0}, Severity.WARNING, "no confirm"),
        ({"lag_bytes": 10, "seconds_since_confirm": 601.0}, Severity.CRITICAL, "no confirm"),
        ({"lag_bytes": 0, "seconds_since_confirm": 9999.0}, Severity.OK, None),
        ({"idle_replication_slot_timeout_seconds": 60}, Severity.OK, None),
        (
            {
                "active": False,
                "seconds_inactive": 10.0,
                "idle_replication_slot_timeout_seconds": 60,
            },
            Severity.WARNING,
            "within 50 s",
        ),
        (
            {
                "active": False,
                "seconds_inactive": 61.0,
                "idle_replication_slot_timeout_seconds": 60,
            },
            Severity.CRITICAL,
            "past idle_replication_slot_timeout (60 s)",
        ),
        ({"failover": False, "synchronized_standby_slots": ""}, Severity.OK, None),
        ({"failover": True, "synchronized_standby_slots": ""}, Severity.WARNING, "is empty"),
        ({"failover": True, "synchronized_standby_slots": "sb1"}, Severity.OK, None),
        (
            {
                "failover": True,
                "synchronized_standby_slots": "sb1",
                "missing_standby_slots": ("sb1",),
            },
            Severity.WARNING,
            "names sb1",
        ),
    ],
)
def test_classify_maps_slot_state_to_severity(changes, severity, needle):
    """Missing, lost or unreserved is critical; lag and stalls escalate through thresholds;
    time without a confirm counts only while there is lag; an inactive slot nears, then passes,
    idle_replication_slot_timeout; a failover slot that no standby holds back is a warning."""
    import dataclasses

    report = classify(dataclasses.replace(HEALTHY, **changes), THRESHOLDS)
    assert report.severity is severity
    if needle is None:
        assert report.problems == ()
    else:
        assert any(needle in problem for problem in report.problems), report.problems


def test_worst_problem_comes_first():
    """With several problems, the severity is the worst and it is listed first."""
    report = classify(
        SlotReport(slot="s", exists=True, active=False, wal_status="lost", lag_bytes=0),
        THRESHOLDS,
    )
    assert report.severity is Severity.CRITICAL
    assert "lost" in report.problems[0]
    assert len(report.problems) == 2


def _status(consumer: Consumer, **env: str) -> tuple[int, dict[str, Any]]:
    result = consumer.cli("status", "--json", env={**consumer.env, **env})
    assert result.stdout, result.stderr
    return result.returncode, json.loads(result.stdout)


@pytest.mark.e2e
def test_consumer_records_progress_after_confirming(make_consumer, clickhouse_server, pg_conn):
    """After a confirmed batch, cdc_progress holds the confirmed LSN and the exact commit time
    of the newest shipped transaction."""
    consumer = make_consumer(clickhouse_server.url)
    consumer.migrate()
    consumer.start()
    ids = publish_probes(pg_conn, 3, "progress")
    committed = pg_conn.execute(
        "SELECT pg_xact_commit_timestamp(xmin) FROM event_outbox WHERE event_id = %s", (ids[0],)
    ).fetchone()[0]
    consumer.wait_confirmed(current_wal_lsn(pg_conn))
    row = wait_for(
        lambda: pg_conn.execute(
            "SELECT last_commit_time, confirmed_lsn::text FROM cdc_progress"
            " WHERE slot = %s AND last_commit_time >= %s",
            (consumer.slot, committed),
        ).fetchone(),
        what="progress recorded",
    )
    assert row[0] == committed
    assert consumer.stop() == 0
    confirmed = pg_conn.execute(
        "SELECT p.confirmed_lsn = s.confirmed_flush_lsn FROM cdc_progress p"
        " JOIN pg_replication_slots s ON s.slot_name = p.slot WHERE p.slot = %s",
        (consumer.slot,),
    ).fetchone()
    assert confirmed == (True,)


@pytest.mark.e2e
def test_lag_with_consumer_stopped_turns_critical(make_consumer, clickhouse_server, pg_conn):
    """Consumer stopped, events published: lag > 0, warning by default, critical past the
    byte threshold, and critical once no confirm came for longer than the stall threshold."""
    # GIVEN a consumer that ran once (progress recorded) and is now stopped
    consumer = make_consumer(clickhouse_server.url)
    consumer.migrate()
    consumer.start()
    consumer.wait_confirmed(current_wal_lsn(pg_conn))
    assert consumer.stop() == 0
    # WHEN events are published with nobody streaming the slot
    publish_probes(pg_conn, 50, "lagging")
    # THEN the report shows the lag; an inactive slot alone is a warning (exit 0)
    code, report = _status(consumer)
    assert code == 0
    assert report["active"] is False
    assert report["lag_bytes"] > 0
    assert report["severity"] == "warning"
    assert report["last_confirmed_at"] is not None
    # AND past the critical byte threshold it is critical (exit 1)
    code, report = _status(consumer, CDC_LAG_CRITICAL_BYTES="1")
    assert (code, report["severity"]) == (1, "critical")
    assert any("lag" in problem for problem in report["problems"])
    # AND with lag, time since the last confirm escalates too
    code, report = _status(consumer, CDC_STALL_CRITICAL_SECONDS="0.001")
    assert (code, report["severity"]) == (1, "critical")
    assert any("no confirm" in problem for problem in report["problems"])
    assert "password" not in json.dumps(report)
    assert consumer.postgres_url not in json.dumps(report)


@pytest.mark.e2e
def test_status_before_migrate_is_critical(make_consumer, clickhouse_server):
    """A missing slot is critical: `status` exits 1 and says so."""
    consumer = make_consumer(clickhouse_server.url)
    code, report = _status(consumer)
    assert code == 1
    assert report["exists"] is False
    assert report["severity"] == "critical"


@pytest.mark.e2e
def test_health_exit_code_follows_the_consumer(make_consumer, clickhouse_server):
    """`health` exits 0 while the consumer streams and records progress, 1 once it stopped."""
    consumer = make_consumer(clickhouse_server.url)
    consumer.migrate()
    assert consumer.cli("health").returncode == 1
    consumer.start()
    wait_for(lambda: consumer.cli("health").returncode == 0, what="consumer healthy")
    assert consumer.stop() == 0
    result = consumer.cli("health")
    assert result.returncode == 1
    assert json.loads(result.stdout) == {"slot": consumer.slot, "alive": False}


@pytest.mark.e2e
def test_progress_failure_does_not_stop_delivery(make_consumer, clickhouse_server, pg_conn):
    """With cdc_progress unwritable the consumer logs it and keeps delivering; once the table
    is back, progress is recorded again."""
    consumer = make_consumer(clickhouse_server.url)
    consumer.migrate()
    away = f"cdc_progress_{uuid.uuid4().hex[:6]}"
    pg_conn.execute(f"ALTER TABLE cdc_progress RENAME TO {away}")
    try:
        consumer.start()
        publish_probes(pg_conn, 5, "no-progress")
        consumer.wait_confirmed(current_wal_lsn(pg_conn))
        wait_for(
            lambda: any(
                e["event"].startswith("progress not recorded") for e in consumer.log_events()
            ),
            what="progress failure logged",
        )
    finally:
        pg_conn.execute(f"ALTER TABLE {away} RENAME TO cdc_progress")
    publish_probes(pg_conn, 1, "progress-back")
    consumer.wait_confirmed(current_wal_lsn(pg_conn))
    wait_for(
        lambda: pg_conn.execute(
            "SELECT 1 FROM cdc_progress WHERE slot = %s", (consumer.slot,)
        ).fetchone(),
        timeout=30,
        what="progress recorded after the table came back",
    )
    assert consumer.stop() == 0


@pytest.mark.e2e
def test_status_reports_the_slot_lifetime(make_consumer, clickhouse_server, pg_conn):
    """`status` reports failover, synced and inactive_since; it warns that a failover slot
    runs ahead of every standby while synchronized_standby_slots is empty, and that
    idle_replication_slot_timeout will invalidate the idle slot."""
    # GIVEN a failover slot nobody streams, on a server with no synchronized_standby_slots
    consumer = make_consumer(clickhouse_server.url, CDC_SLOT_FAILOVER="true")
    consumer.migrate()
    code, report = _status(consumer)
    # THEN the report says what the slot is and since when it is idle
    assert code == 0
    assert (report["failover"], report["synced"]) == (True, False)
    assert report["inactive_since"] is not None
    assert report["idle_replication_slot_timeout_seconds"] == 0
    assert report["synchronized_standby_slots"] == ""
    assert any("synchronized_standby_slots is empty" in p for p in report["problems"])
    assert not any("idle_replication_slot_timeout" in p for p in report["problems"])
    # WHEN the server invalidates slots idle for an hour
    with server_setting(pg_conn, "idle_replication_slot_timeout", "1h"):
        # (the reload reaches new sessions a moment later)
        code, report = wait_for(
            lambda: (
                (seen := _status(consumer))[1]["idle_replication_slot_timeout_seconds"] and seen
            ),
            what="the idle timeout in force",
        )
    # THEN the idle slot's countdown is a warning
    assert (code, report["severity"]) == (0, "warning")
    assert report["idle_replication_slot_timeout_seconds"] == 3600
    assert any("idle_replication_slot_timeout is 3600 s" in p for p in report["problems"])
