"""The slot check: the replication slot, the consumer's recorded progress, and how bad it is.

One report, three readers: `python -m cdc_consumer status`, the web app's `GET /health/outbox`
and the Celery slot check (which also logs and alerts). It holds positions, sizes, times and
the slot's name, never a connection string.

The failure that hurts most in production is a slot that pins WAL until the primary's disk
fills. Hence the rules in `classify`: a missing slot, or one PostgreSQL has given up on
(`wal_status` unreserved or lost), is critical at once; lag in bytes and seconds without
progress (while there is lag) escalate through the thresholds from the environment.

The slot's lifetime (PostgreSQL 17+, NULL before): whether it is a failover slot that standbys
keep in step (`failover`, `synced`), and since when nobody streams it (`inactive_since`), which
PostgreSQL 18's `idle_replication_slot_timeout` turns into an invalidation. A failover slot whose
walsender does not wait for a standby (`synchronized_standby_slots` empty) can hand the consumer
changes no standby has yet; after a failover the consumer then holds events the new primary
never had (docs/runbook-failover.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from datetime import datetime
from enum import StrEnum
from typing import Any

import psycopg


class Severity(StrEnum):
    OK = "ok"
    WARNING = "warning"
    CRITICAL = "critical"


_RANK = {Severity.OK: 0, Severity.WARNING: 1, Severity.CRITICAL: 2}


def severity_rank(severity: Severity) -> int:
    """Order of severities, worst highest (to take the worst of several reports)."""
    return _RANK[severity]


# wal_status values meaning the slot can no longer (or may soon no longer) replay what it missed.
_GIVEN_UP = frozenset({"unreserved", "lost"})


@dataclass(frozen=True, slots=True)
class SlotThresholds:
    lag_warning_bytes: int
    lag_critical_bytes: int
    stall_warning_seconds: float
    stall_critical_seconds: float


@dataclass(frozen=True, slots=True)
class SlotReport:
    slot: str
    exists: bool
    active: bool = False
    active_pid: int | None = None
    wal_status: str | None = None
    safe_wal_size_bytes: int | None = None
    confirmed_flush_lsn: str | None = None
    current_wal_lsn: str | None = None
    lag_bytes: int | None = None
    # PostgreSQL 17+ (None on older servers).
    failover: bool | None = None
    synced: bool | None = None
    inactive_since: datetime | None = None
    seconds_inactive: float | None = None
    invalidation_reason: str | None = None
    # Server settings that decide the slot's lifetime: 0 is off (PostgreSQL 18+); the physical
    # slots a failover slot's walsender waits for (PostgreSQL 17+); names listed there that no
    # slot has.
    idle_replication_slot_timeout_seconds: int | None = None
    synchronized_standby_slots: str | None = None
    missing_standby_slots: tuple[str, ...] = ()
    # From cdc_progress, which the consumer writes after each confirmed position.
    last_confirmed_at: datetime | None = None
    last_shipped_commit_time: datetime | None = None
    seconds_since_confirm: float | None = None
    severity: Severity = Severity.OK
    problems: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: times as ISO 8601 strings, severity as its name."""
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, datetime):
                out[key] = value.isoformat()
        out["severity"] = self.severity.value
        out["problems"] = list(self.problems)
        return out


def slot_report(conn: psycopg.Connection[Any], slot: str, thresholds: SlotThresholds) -> SlotReport:
    """Read the slot and the consumer's progress, and classify them against `thresholds`."""
    return classify(_read(conn, slot), thresholds)


# Columns and settings that older servers lack read NULL: the slot row goes through to_jsonb,
# and current_setting(..., true) answers NULL for a setting the server does not know.
_SLOT_QUERY = """
SELECT active, active_pid, wal_status, safe_wal_size,
       confirmed_flush_lsn::text, pg_current_wal_lsn()::text,
       pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint,
       (to_jsonb(s) ->> 'failover')::boolean,
       (to_jsonb(s) ->> 'synced')::boolean,
       (to_jsonb(s) ->> 'inactive_since')::timestamptz,
       extract(epoch FROM clock_timestamp() - (to_jsonb(s) ->> 'inactive_since')::timestamptz),
       to_jsonb(s) ->> 'invalidation_reason'
FROM pg_replication_slots s WHERE slot_name = %s
"""
_SETTINGS_QUERY = """
SELECT (SELECT setting::bigint * CASE unit WHEN 'min' THEN 60 WHEN 'ms' THEN 0.001 ELSE 1 END
          FROM pg_settings WHERE name = 'idle_replication_slot_timeout')::bigint,
       current_setting('synchronized_standby_slots', true)
"""


def _read(conn: psycopg.Connection[Any], slot: str) -> SlotReport:
    row = conn.execute(_SLOT_QUERY, (slot,)).fetchone()
    report = SlotReport(slot=slot, exists=row is not None)
    if row is not None:
        (active, pid, wal_status, safe, confirmed, current, lag, failover, synced, since,
         inactive, reason) = row  # fmt: skip
        report = replace(
            report,
            active=bool(active),
            active_pid=pid,
            wal_status=wal_status,
            safe_wal_size_bytes=safe,
            confirmed_flush_lsn=confirmed,
            current_wal_lsn=current,
            lag_bytes=lag,
            failover=failover,
            synced=synced,
            inactive_since=since,
            seconds_inactive=None if inactive is None else round(float(inactive), 3),
            invalidation_reason=reason,
        )
    settings = conn.execute(_SETTINGS_QUERY).fetchone()
    if settings is not None:
        timeout, standby_slots = settings
        report = replace(
            report,
            idle_replication_slot_timeout_seconds=timeout,
            synchronized_standby_slots=standby_slots,
            missing_standby_slots=_missing_slots(conn, standby_slots),
        )
    progress = _progress(conn, slot)
    if progress is not None:
        confirmed_at, commit_time, seconds = progress
        report = replace(
            report,
            last_confirmed_at=confirmed_at,
            last_shipped_commit_time=commit_time,
            seconds_since_confirm=round(float(seconds), 3),
        )
    return report


def _missing_slots(conn: psycopg.Connection[Any], names: str | None) -> tuple[str, ...]:
    """The physical slots synchronized_standby_slots names that this server does not have: a
    failover slot's walsender waits for them, so the consumer would stall."""
    listed = [name.strip().strip('"') for name in (names or "").split(",") if name.strip()]
    if not listed:
        return ()
    rows = conn.execute(
        "SELECT slot_name::text FROM pg_replication_slots WHERE slot_type = 'physical'"
        " AND slot_name = ANY(%s)",
        (listed,),
    ).fetchall()
    present = {row[0] for row in rows}
    return tuple(name for name in listed if name not in present)


def _progress(conn: psycopg.Connection[Any], slot: str) -> tuple[Any, ...] | None:
    # Before the first `migrate` the table does not exist yet: report the slot alone.
    exists = conn.execute("SELECT to_regclass('cdc_progress') IS NOT NULL").fetchone()
    if not (exists and exists[0]):
        return None
    return conn.execute(
        "SELECT confirmed_at, last_commit_time,"
        " extract(epoch FROM clock_timestamp() - confirmed_at)"
        " FROM cdc_progress WHERE slot = %s",
        (slot,),
    ).fetchone()


def classify(report: SlotReport, thresholds: SlotThresholds) -> SlotReport:
    """The report with its severity and the problems that set it, worst first."""
    found: list[tuple[Severity, str]] = []
    if not report.exists:
        found.append(
            (
                Severity.CRITICAL,
                "slot missing: backfill --since a time before it went (it recreates the slot)",
            )
        )
    else:
        if report.wal_status in _GIVEN_UP:
            why = (
                f" (invalidated: {report.invalidation_reason})"
                if report.invalidation_reason
                else ""
            )
            found.append(
                (
                    Severity.CRITICAL,
                    f"wal_status is {report.wal_status}{why}: the slot is losing WAL; recreate"
                    " it and backfill (see docs/architecture.md, operations)",
                )
            )
        elif report.wal_status == "extended":
            found.append(
                (Severity.WARNING, "wal_status is extended: retaining beyond max_wal_size")
            )
        if not report.active:
            found.append((Severity.WARNING, "no consumer is streaming the slot"))
        found.extend(_lifetime_problems(report))
        found.extend(_lag_problems(report, thresholds))
    if not found:
        return replace(report, severity=Severity.OK, problems=())
    found.sort(key=lambda item: severity_rank(item[0]), reverse=True)
    return replace(report, severity=found[0][0], problems=tuple(text for _, text in found))


def _lifetime_problems(report: SlotReport) -> list[tuple[Severity, str]]:
    """What can end the slot's life: the idle timeout, and a failover slot that runs ahead of
    every standby or waits for one that does not exist."""
    found = []
    timeout = report.idle_replication_slot_timeout_seconds or 0
    idle = report.seconds_inactive
    if timeout > 0 and not report.active and idle is not None and report.wal_status != "lost":
        if idle >= timeout:
            found.append(
                (
                    Severity.CRITICAL,
                    f"inactive for {idle:.0f} s, past idle_replication_slot_timeout ({timeout} s):"
                    " the next checkpoint invalidates the slot; start the consumer now",
                )
            )
        else:
            found.append(
                (
                    Severity.WARNING,
                    f"idle_replication_slot_timeout is {timeout} s: the slot, inactive for"
                    f" {idle:.0f} s, is invalidated (then backfill) unless a consumer streams"
                    f" it within {timeout - idle:.0f} s",
                )
            )
    if report.failover and not (report.synchronized_standby_slots or "").strip():
        found.append(
            (
                Severity.WARNING,
                "failover slot, but synchronized_standby_slots is empty: the consumer may ship"
                " changes no standby has, which a promoted standby then lacks; list the"
                " standbys' physical slots there (docs/runbook-failover.md)",
            )
        )
    if report.failover and report.missing_standby_slots:
        names = ", ".join(report.missing_standby_slots)
        found.append(
            (
                Severity.WARNING,
                f"synchronized_standby_slots names {names}, which this server has no physical"
                " slot for: failover slots wait for it, so the consumer stalls",
            )
        )
    return found


def _lag_problems(report: SlotReport, thresholds: SlotThresholds) -> list[tuple[Severity, str]]:
    lag = report.lag_bytes or 0
    found = []
    for severity, limit in (
        (Severity.CRITICAL, thresholds.lag_critical_bytes),
        (Severity.WARNING, thresholds.lag_warning_bytes),
    ):
        if lag >= limit > 0:
            found.append((severity, f"lag {lag} bytes reached the {severity} threshold {limit}"))
            break
    stalled = report.seconds_since_confirm
    if lag > 0 and stalled is not None:
        for severity, limit_s in (
            (Severity.CRITICAL, thresholds.stall_critical_seconds),
            (Severity.WARNING, thresholds.stall_warning_seconds),
        ):
            if stalled >= limit_s > 0:
                found.append(
                    (
                        severity,
                        f"no confirm for {stalled:.0f} s with lag: {severity} threshold"
                        f" {limit_s:.0f} s",
                    )
                )
                break
    return found
