"""The slot check: the replication slot, the consumer's recorded progress, and how bad it is.

One report, three readers: `python -m cdc_consumer status`, the web app's `GET /health/outbox`
and the Celery slot check (which also logs and alerts). It holds positions, sizes, times and
the slot's name, never a connection string.

The failure that hurts most in production is a slot that pins WAL until the primary's disk
fills. Hence the rules in `classify`: a missing slot, or one PostgreSQL has given up on
(`wal_status` unreserved or lost), is critical at once; lag in bytes and seconds without
progress (while there is lag) escalate through the thresholds from the environment.
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


def _read(conn: psycopg.Connection[Any], slot: str) -> SlotReport:
    row = conn.execute(
        "SELECT active, active_pid, wal_status, safe_wal_size,"
        " confirmed_flush_lsn::text, pg_current_wal_lsn()::text,"
        " pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint"
        " FROM pg_replication_slots WHERE slot_name = %s",
        (slot,),
    ).fetchone()
    report = SlotReport(slot=slot, exists=row is not None)
    if row is not None:
        active, pid, wal_status, safe, confirmed, current, lag = row
        report = replace(
            report,
            active=bool(active),
            active_pid=pid,
            wal_status=wal_status,
            safe_wal_size_bytes=safe,
            confirmed_flush_lsn=confirmed,
            current_wal_lsn=current,
            lag_bytes=lag,
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
        found.append((Severity.CRITICAL, "slot missing: run migrate, then backfill the gap"))
    else:
        if report.wal_status in _GIVEN_UP:
            found.append(
                (
                    Severity.CRITICAL,
                    f"wal_status is {report.wal_status}: the slot is losing WAL; recreate it"
                    " and backfill (see docs/architecture.md, operations)",
                )
            )
        elif report.wal_status == "extended":
            found.append(
                (Severity.WARNING, "wal_status is extended: retaining beyond max_wal_size")
            )
        if not report.active:
            found.append((Severity.WARNING, "no consumer is streaming the slot"))
        found.extend(_lag_problems(report, thresholds))
    if not found:
        return replace(report, severity=Severity.OK, problems=())
    found.sort(key=lambda item: _RANK[item[0]], reverse=True)
    return replace(report, severity=found[0][0], problems=tuple(text for _, text in found))


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
