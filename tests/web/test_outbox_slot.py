"""web.outbox.slot: the slot check logs at the report's level and alerts Sentry on a breach."""

from __future__ import annotations

import dataclasses
import logging

import pytest

from tests.support.fix_consumer import current_wal_lsn, wait_for
from web.outbox.slot import outbox_slot_check


@pytest.mark.django_db
def test_missing_slot_is_critical_in_the_log_and_in_sentry(settings, caplog, sentry_events):
    """A missing slot: one CRITICAL log line with the slot and problems, one fatal Sentry
    message grouped by slot and severity."""
    settings.CDC_SLOT = "no_such_slot"
    with caplog.at_level(logging.INFO, logger="web.outbox.slot"):
        report = outbox_slot_check()
    assert report.severity == "critical"
    [record] = [r for r in caplog.records if r.name == "web.outbox.slot"]
    assert record.levelno == logging.CRITICAL
    assert record.msg["slot"] == "no_such_slot"
    assert "slot missing" in record.msg["problems"][0]
    [event] = sentry_events
    assert event["level"] == "fatal"
    assert event["fingerprint"] == ["replication-slot", "no_such_slot", "critical"]
    assert "no_such_slot critical: slot missing" in event["message"]


@pytest.mark.e2e
@pytest.mark.django_db
def test_warning_and_ok_levels(settings, caplog, sentry_events, make_consumer, clickhouse_server):
    """A slot nobody streams is a warning (log line and Sentry); a streamed slot within the
    thresholds is ok: an info line and nothing sent to Sentry."""
    consumer = make_consumer(clickhouse_server.url)
    consumer.migrate()
    settings.CDC_SLOT = consumer.slot
    with caplog.at_level(logging.INFO, logger="web.outbox.slot"):
        report = outbox_slot_check()
    assert report.severity == "warning"
    assert [r.levelno for r in caplog.records if r.name == "web.outbox.slot"] == [logging.WARNING]
    assert [event["level"] for event in sentry_events] == ["warning"]
    consumer.start()
    try:
        caplog.clear()
        settings.SLOT_THRESHOLDS = dataclasses.replace(
            settings.SLOT_THRESHOLDS, lag_warning_bytes=0, lag_critical_bytes=0
        )
        with caplog.at_level(logging.INFO, logger="web.outbox.slot"):
            report = outbox_slot_check()
        assert report.severity == "ok", report.problems
        assert [r.levelno for r in caplog.records if r.name == "web.outbox.slot"] == [logging.INFO]
        assert len(sentry_events) == 1
    finally:
        assert consumer.stop() == 0


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_a_streaming_slot_left_out_of_outbox_slots_is_a_warning(
    settings, sentry_events, make_consumer, clickhouse_server, pg_conn
):
    """The Beat check names a slot that records progress but is missing from OUTBOX_SLOTS, at
    warning level at least, with a Sentry message: the prune is stopped until it is listed."""
    from web.outbox.tasks import outbox_slot_check_task

    listed, unlisted = make_consumer(clickhouse_server.url), make_consumer(clickhouse_server.url)
    for consumer in (listed, unlisted):
        consumer.migrate()
        consumer.start()
        consumer.wait_confirmed(current_wal_lsn(pg_conn))
        assert consumer.stop() == 0
    wait_for(
        lambda: (
            pg_conn.execute(
                "SELECT count(*) FROM cdc_progress WHERE slot = ANY(%s)",
                ([listed.slot, unlisted.slot],),
            ).fetchone()
            == (2,)
        ),
        what="both consumers recorded progress",
    )
    settings.OUTBOX_SLOTS = [listed.slot]
    report = outbox_slot_check_task()
    assert report["unlisted_slots"] == [unlisted.slot]
    assert report["severity"] in {"warning", "critical"}
    assert [s["slot"] for s in report["slots"]] == [listed.slot]
    assert any(
        e["fingerprint"] == ["replication-slot-unlisted", unlisted.slot] for e in sentry_events
    )
