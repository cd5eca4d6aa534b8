"""`cdc_progress`: what the consumer has shipped, recorded after each confirmed position.

The replication connection is in COPY BOTH mode and cannot run SQL, so this writer has its own
ordinary connection. A failure here never stops delivery: it is logged, and a later status
update writes the then-current values again; the upsert only ever moves positions and times
forward.

A write happens when a newer transaction has shipped, and otherwise at most every
REFRESH_SECONDS (so `updated_at` shows the consumer alive). Not on every status update: the
write is itself WAL, which lets an idle slot confirm a little further, which would trigger the
next write, and so on.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import structlog

from cdc_consumer import pgoutput, postgres
from cdc_consumer.metrics import OFF, Metrics

log = structlog.get_logger(__name__)

PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
_RECONNECT_SECONDS = 10.0
REFRESH_SECONDS = 30.0

# confirmed_at moves only when the position does, so "seconds since the last confirm" keeps
# growing while the consumer is alive but stuck; updated_at shows it is alive.
_UPSERT = """
INSERT INTO cdc_progress AS p (slot, confirmed_lsn, last_commit_time, confirmed_at, updated_at)
VALUES (%(slot)s, %(lsn)s::pg_lsn, %(commit_time)s, now(), now())
ON CONFLICT (slot) DO UPDATE SET
    confirmed_at = CASE WHEN EXCLUDED.confirmed_lsn > p.confirmed_lsn
                        THEN now() ELSE p.confirmed_at END,
    confirmed_lsn = GREATEST(p.confirmed_lsn, EXCLUDED.confirmed_lsn),
    last_commit_time = GREATEST(p.last_commit_time, EXCLUDED.last_commit_time),
    updated_at = now()
RETURNING pg_wal_lsn_diff(pg_current_wal_lsn(), p.confirmed_lsn)::bigint
"""


def commit_time_from_pgoutput(microseconds: int) -> datetime:
    """A pgoutput Commit's timestamp (microseconds since 2000-01-01 UTC) as a datetime."""
    return PG_EPOCH + timedelta(microseconds=microseconds)


class ProgressRecorder:
    """Upserts this slot's row in cdc_progress; never raises. Each write also reads the slot's
    lag in WAL bytes for `metrics` (the replication connection cannot run SQL)."""

    def __init__(self, database_url: str, slot: str, *, metrics: Metrics = OFF) -> None:
        self._url = database_url
        self._slot = slot
        self._metrics = metrics
        self._conn: psycopg.Connection[Any] | None = None
        self._retry_at = 0.0
        self._written_at: float | None = None
        self._written_commit_time: datetime | None = None

    def record(
        self, *, confirmed_lsn: int, commit_time: datetime | None, force: bool = False
    ) -> None:
        """Record the confirmed position and the commit time of the newest shipped transaction
        (`force`: even if nothing new shipped, e.g. the final position at shutdown)."""
        now = time.monotonic()
        fresh = self._written_at is not None and now - self._written_at < REFRESH_SECONDS
        unchanged = fresh and commit_time == self._written_commit_time and not force
        if now < self._retry_at or unchanged:
            return
        try:
            if self._conn is None or self._conn.closed:
                # A hung server must not stall the main loop past wal_sender_timeout.
                self._conn = postgres.connect(
                    self._url,
                    autocommit=True,
                    connect_timeout=5,
                    settings={"statement_timeout": "5000"},
                )
            lag = self._conn.execute(
                _UPSERT,
                {
                    "slot": self._slot,
                    "lsn": pgoutput.lsn_to_str(confirmed_lsn),
                    "commit_time": commit_time,
                },
            ).fetchone()
            if lag is not None:
                self._metrics.lag(int(lag[0]))
            self._written_at, self._written_commit_time = now, commit_time
        except psycopg.Error as exc:
            log.warning(
                "progress not recorded, retrying later",
                slot=self._slot,
                error=postgres.first_line(exc),
                hint="delivery goes on; cdc_progress only feeds pruning and the slot check",
            )
            self.close()
            self._retry_at = time.monotonic() + _RECONNECT_SECONDS

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
