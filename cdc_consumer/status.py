"""What `python -m cdc_consumer status` reports: the slot and how far behind it is."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import psycopg


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

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def slot_report(conn: psycopg.Connection[Any], slot: str) -> SlotReport:
    """Read the slot's state and its lag behind the server's current WAL position."""
    row = conn.execute(
        "SELECT active, active_pid, wal_status, safe_wal_size,"
        " confirmed_flush_lsn::text, pg_current_wal_lsn()::text,"
        " pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint"
        " FROM pg_replication_slots WHERE slot_name = %s",
        (slot,),
    ).fetchone()
    if row is None:
        return SlotReport(slot=slot, exists=False)
    active, pid, wal_status, safe, confirmed, current, lag = row
    return SlotReport(
        slot=slot,
        exists=True,
        active=bool(active),
        active_pid=pid,
        wal_status=wal_status,
        safe_wal_size_bytes=safe,
        confirmed_flush_lsn=confirmed,
        current_wal_lsn=current,
        lag_bytes=lag,
    )
