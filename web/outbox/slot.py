"""The slot check, from Django: the consumer's report (cdc_consumer.status), read over Django's
own database connection, and the alert a breach raises (structured log line and Sentry).

`outbox_slot_report` only reads (the health view uses it); `outbox_slot_check` also alerts (the
Celery task and the management command use it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import sentry_sdk
import structlog
from django.conf import settings
from django.db import connection
from sentry_sdk.integrations.logging import ignore_logger

from cdc_consumer.shard import PublicationRecord
from cdc_consumer.status import Severity, SlotReport, severity_rank, slot_report

log = structlog.get_logger(__name__)
# The check sends its own Sentry message with the report attached; Sentry's logging integration
# would otherwise turn the same breach's log line into a second event.
ignore_logger(__name__)

_SENTRY_LEVEL: dict[Severity, Literal["warning", "fatal"]] = {
    Severity.WARNING: "warning",
    Severity.CRITICAL: "fatal",
}


def outbox_slots() -> list[str]:
    """Every slot that streams the outbox: OUTBOX_SLOTS, or CDC_SLOT alone."""
    return list(settings.OUTBOX_SLOTS) or [settings.CDC_SLOT]


def outbox_unlisted_slots(slots: Sequence[str]) -> list[str]:
    """Slots of this database that stream the outbox but `slots` leaves out: the prune would
    not wait for them, nor the slot check look at them. A slot streams the outbox when a
    consumer records progress for it (cdc_progress), or a publication `migrate` or the
    backfill made names it in its record (a shard that has not shipped yet)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT obj_description(oid, 'pg_publication') FROM pg_publication")
        records = (PublicationRecord.from_comment(row[0]) for row in cursor.fetchall())
        recorded = [record.slot for record in records if record is not None]
        cursor.execute(
            "SELECT s.slot_name FROM pg_replication_slots s WHERE s.database = current_database()"
            " AND s.slot_name <> ALL(%s) AND (s.slot_name = ANY(%s)"
            " OR EXISTS (SELECT FROM cdc_progress p WHERE p.slot = s.slot_name)) ORDER BY 1",
            [list(slots), recorded],
        )
        return [str(row[0]) for row in cursor.fetchall()]


def outbox_slots_report(reports: list[SlotReport], unlisted: list[str]) -> dict[str, Any]:
    """Several slots' reports as one: the worst severity (at least a warning with slots left
    out of OUTBOX_SLOTS), each report, and the slots left out."""
    worst = max(
        [report.severity for report in reports] + [Severity.WARNING] * bool(unlisted),
        key=severity_rank,
    )
    return {
        "severity": worst.value,
        "slots": [report.as_dict() for report in reports],
        "unlisted_slots": unlisted,
    }


def outbox_unlisted_check(slots: list[str]) -> list[str]:
    """The slots left out of `slots`, with a warning line and a Sentry message when any are."""
    unlisted = outbox_unlisted_slots(slots)
    if unlisted:
        log.warning("replication slot not in outbox_slots", slots=unlisted)
        with sentry_sdk.new_scope() as scope:
            scope.fingerprint = ["replication-slot-unlisted", *unlisted]
            sentry_sdk.capture_message(
                f"replication slot {', '.join(unlisted)} streams the outbox but is not in"
                " OUTBOX_SLOTS: the prune is stopped until it is listed or dropped",
                level="warning",
            )
    return unlisted


def outbox_slot_report(*, slot: str | None = None) -> SlotReport:
    """The slot report for `slot` (default CDC_SLOT), judged by the configured thresholds."""
    connection.ensure_connection()
    return slot_report(connection.connection, slot or settings.CDC_SLOT, settings.SLOT_THRESHOLDS)


def outbox_slot_check(*, slot: str | None = None) -> SlotReport:
    """The report, plus a log line at its severity and, on a breach, a Sentry message."""
    report = outbox_slot_report(slot=slot)
    fields = {
        "slot": report.slot,
        "severity": report.severity.value,
        "problems": list(report.problems),
        "active": report.active,
        "wal_status": report.wal_status,
        "lag_bytes": report.lag_bytes,
        "seconds_since_confirm": report.seconds_since_confirm,
    }
    if report.severity is Severity.OK:
        log.info("replication slot ok", **fields)
        return report
    if report.severity is Severity.WARNING:
        log.warning("replication slot needs attention", **fields)
    else:
        log.critical("replication slot critical", **fields)
    # One event per breach, grouped per slot and severity, with the report as context.
    with sentry_sdk.new_scope() as scope:
        scope.fingerprint = ["replication-slot", report.slot, report.severity.value]
        scope.set_context("slot", report.as_dict())
        sentry_sdk.capture_message(
            f"replication slot {report.slot} {report.severity.value}: {report.problems[0]}",
            level=_SENTRY_LEVEL[report.severity],
        )
    return report
