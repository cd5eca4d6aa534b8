"""`python -m cdc_consumer verify --since T [--until U] [--json]`: prove the pipeline whole.

The outbox is the truth. Every event it holds that was created in the window and has shipped
must be in event_log exactly once, or in event_log_dead_letter. verify lists the events in
neither (missing) and those event_log holds more than once (doubled); any of either makes it
exit 1. Rows count whichever source wrote them: an event shipped by this consumer and again by
another (a shard beside it, the consumer shards replaced) is doubled. With CDC_SHARD only the
shard's events are judged, against its own slot's progress; each shard verifies its own.

What the window is, and why:
- Rows whose `created_at` is in [since, until): the column the outbox is indexed on, so the
  read is a range scan. `backfill --since` selects by commit time, never earlier than
  `created_at`, so every event `verify --since T` lists missing, `backfill --since T` re-ships.
- Of those, only rows whose transaction committed no later than the newest commit the consumer
  has shipped (`cdc_progress.last_commit_time`, compared with `pg_xact_commit_timestamp(xmin)`,
  the same timestamp pgoutput sends) are judged. The slot ships in commit order, so a row
  committed later may simply not have shipped yet: it is counted as in flight, not missing. A
  row whose commit time PostgreSQL no longer keeps (older than its commit-timestamp horizon, or
  frozen) is far older than anything in flight, and is judged.
- Pruned rows are gone from the outbox, so they are neither checked nor reported: verify proves
  the events the outbox still holds (OUTBOX_RETENTION, 7 days by default). Events in event_log
  that the outbox lacks are not reported at all: the outbox keeps no record of what it pruned,
  so such an event could be pruned or foreign, and neither is an event lost or doubled.

How it counts: physical rows per event id, without FINAL, so a duplicate a ReplacingMergeTree
merge has not folded yet is still counted (and one a merge folded is gone for every reader);
lightweight-deleted rows do not count. The outbox is read in pages of PAGE_ROWS by keyset
(short queries, no long snapshot), each page looked up in ClickHouse by event id within the
page's event_date_time range; only the first LISTED_MAX missing and doubled events are kept for
the report, so memory stays flat whatever the window holds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import psycopg
import structlog
from psycopg import sql

from cdc_consumer import postgres
from cdc_consumer.clickhouse import ClickHouseTransport
from cdc_consumer.clickhouse_sink import stored_event_counts
from cdc_consumer.errors import ErrorKind, PipelineError
from cdc_consumer.outbox import OUTBOX_SCHEMA, OUTBOX_TABLE
from cdc_consumer.shard import Shard, outbox_condition

log = structlog.get_logger(__name__)

PAGE_ROWS = 10_000
LISTED_MAX = 1_000

# Each page: the next PAGE_ROWS rows of the window in (created_at, event_id) order, with
# whether each has shipped (committed by the newest shipped commit).
_PAGE = """
SELECT event_id::text, event_type, event_date_time, created_at,
       coalesce(pg_xact_commit_timestamp(xmin) <= %(shipped)s, true) AS due
FROM {table}
WHERE created_at >= %(since)s AND created_at < %(until)s AND {shard} {after}
ORDER BY created_at, event_id
LIMIT %(limit)s
"""
# The plain bound is the one the created_at index can seek to, so a page reads from where the
# last one ended (plus the rows sharing its created_at: one transaction's rows share now()),
# not from `since` again.
_AFTER = (
    "AND created_at >= %(after_created_at)s"
    " AND (created_at, event_id) > (%(after_created_at)s, %(after_event_id)s::uuid)"
)


@dataclass(slots=True)
class VerifyReport:
    source: str
    since: str
    until: str
    shipped_until: str | None  # the newest commit the consumer has recorded as shipped
    checked: int = 0  # outbox rows in the window that have shipped
    delivered: int = 0  # ... of which in event_log (once or more)
    dead_lettered: int = 0  # ... in event_log_dead_letter only
    missing_count: int = 0  # ... in neither
    doubled_count: int = 0  # ... more than one row in event_log
    in_flight: int = 0  # rows in the window committed after shipped_until: not judged
    earliest_missing_created_at: str | None = None  # what `backfill --since` needs
    missing: list[dict[str, str]] = field(default_factory=list)  # the first LISTED_MAX
    doubled: list[dict[str, Any]] = field(default_factory=list)  # the first LISTED_MAX

    @property
    def whole(self) -> bool:
        return self.missing_count == 0 and self.doubled_count == 0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "whole": self.whole, "listed_max": LISTED_MAX}


def verify(
    database_url: str,
    transport: ClickHouseTransport,
    *,
    slot: str,
    source: str,
    shard: Shard | None = None,
    cluster: str | None = None,
    since: datetime,
    until: datetime | None = None,
) -> VerifyReport:
    """Compare the outbox's events created in [since, until) (until: now) with what ClickHouse
    holds for `source`; see the module docstring for what is judged and how."""
    try:
        return _verify(
            database_url,
            transport,
            slot=slot,
            source=source,
            shard=shard,
            cluster=cluster,
            since=since,
            until=until,
        )
    except psycopg.Error as exc:
        # Not a finding: exit 1 must only ever mean "missing or doubled".
        detail = postgres.first_line(exc)
        raise PipelineError(
            ErrorKind.TRANSIENT_SOURCE,
            f"postgresql request failed: {detail}",
            hint="check DATABASE_URL, and that `python -m cdc_consumer migrate` has run there",
        ) from exc


def _verify(
    database_url: str,
    transport: ClickHouseTransport,
    *,
    slot: str,
    source: str,
    shard: Shard | None,
    cluster: str | None,
    since: datetime,
    until: datetime | None,
) -> VerifyReport:
    with postgres.connect(database_url, autocommit=True) as conn:
        shipped, now = _shipped_until(conn, slot)
        until = until or now
        if until <= since:
            raise PipelineError(
                ErrorKind.CONFIGURATION,
                f"the window is empty: --until {until.isoformat()} is not after --since"
                f" {since.isoformat()}",
                hint="give --since an earlier time than --until (default: now)",
            )
        report = VerifyReport(
            source=source,
            since=since.isoformat(),
            until=until.isoformat(),
            shipped_until=shipped.isoformat() if shipped else None,
        )
        after: tuple[datetime, str] | None = None
        while page := _page(conn, shard, since=since, until=until, shipped=shipped, after=after):
            _judge(report, transport, page, cluster=cluster)
            after = (page[-1][3], page[-1][0])
    log.info(
        "verify done",
        source=source,
        checked=report.checked,
        missing=report.missing_count,
        doubled=report.doubled_count,
        in_flight=report.in_flight,
    )
    return report


def _shipped_until(conn: psycopg.Connection[Any], slot: str) -> tuple[datetime | None, datetime]:
    """The newest shipped commit time of `slot` (None before anything shipped), and the
    server's clock (the default end of the window, on the clock created_at was set by)."""
    [setting] = conn.execute("SHOW track_commit_timestamp").fetchone() or ("off",)
    if setting != "on":
        raise PipelineError(
            ErrorKind.CONFIGURATION,
            "track_commit_timestamp is off: verify cannot tell shipped rows from rows in flight",
            hint="set track_commit_timestamp = on (postgres.conf) and restart PostgreSQL",
        )
    row = conn.execute(
        "SELECT (SELECT last_commit_time FROM cdc_progress WHERE slot = %s), clock_timestamp()",
        (slot,),
    ).fetchone()
    assert row is not None  # a SELECT without FROM always answers one row
    return row[0], row[1]


def _page(
    conn: psycopg.Connection[Any],
    shard: Shard | None,
    *,
    since: datetime,
    until: datetime,
    shipped: datetime | None,
    after: tuple[datetime, str] | None,
) -> list[tuple[Any, ...]]:
    query = sql.SQL(_PAGE).format(
        table=sql.Identifier(OUTBOX_SCHEMA, OUTBOX_TABLE),
        shard=outbox_condition(shard),
        after=sql.SQL(_AFTER if after else ""),
    )
    params: dict[str, Any] = {
        # Nothing shipped yet: every row with a known commit time is in flight.
        "shipped": shipped if shipped is not None else "-infinity",
        "since": since,
        "until": until,
        "limit": PAGE_ROWS,
    }
    if after is not None:
        params["after_created_at"], params["after_event_id"] = after
    return conn.execute(query, params).fetchall()


def _judge(
    report: VerifyReport,
    transport: ClickHouseTransport,
    page: list[tuple[Any, ...]],
    *,
    cluster: str | None,
) -> None:
    due = [row for row in page if row[4]]
    report.in_flight += len(page) - len(due)
    if not due:
        return
    times = [row[2] for row in due]
    stored = stored_event_counts(
        transport, [row[0] for row in due], between=(min(times), max(times)), cluster=cluster
    )
    for event_id, event_type, event_date_time, created_at, _due in due:
        report.checked += 1
        counts = stored.get(event_id)
        if counts is None:
            _missing(report, event_id, event_type, event_date_time, created_at)
        elif counts.event_log == 0:
            report.dead_lettered += 1
        else:
            report.delivered += 1
            if counts.event_log > 1:
                report.doubled_count += 1
                if len(report.doubled) < LISTED_MAX:
                    report.doubled.append({"event_id": event_id, "rows": counts.event_log})


def _missing(
    report: VerifyReport,
    event_id: str,
    event_type: str,
    event_date_time: datetime,
    created_at: datetime,
) -> None:
    report.missing_count += 1
    created = created_at.isoformat()
    # Pages come in created_at order, so the first missing event is the earliest.
    if report.earliest_missing_created_at is None:
        report.earliest_missing_created_at = created
    if len(report.missing) < LISTED_MAX:
        report.missing.append(
            {
                "event_id": event_id,
                "event_type": event_type,
                "event_date_time": event_date_time.isoformat(),
                "created_at": created,
            }
        )


def summary(report: VerifyReport) -> str:
    """The report for a person: counts, the listed events, and what to do about them."""
    lines = [
        f"verify {report.source}: outbox events created from {report.since} to {report.until},"
        f" shipped by {report.shipped_until or '(nothing shipped yet)'}",
        f"  checked        {report.checked}",
        f"  delivered      {report.delivered}",
        f"  dead-lettered  {report.dead_lettered}  (in event_log_dead_letter: delivered, see"
        " its error column)",
        f"  missing        {report.missing_count}",
        f"  doubled        {report.doubled_count}",
        f"  in flight      {report.in_flight}  (committed after the newest shipped commit: not"
        " judged)",
    ]
    if report.missing_count:
        lines.append("missing (in neither event_log nor event_log_dead_letter):")
        lines += [
            f"  {e['event_id']}  {e['event_type']}  created {e['created_at']}"
            for e in report.missing
        ]
        lines += _more(report.missing_count, len(report.missing))
    if report.doubled_count:
        lines.append("doubled (more than one row in event_log):")
        lines += [f"  {e['event_id']}  {e['rows']} rows" for e in report.doubled]
        lines += _more(report.doubled_count, len(report.doubled))
    if report.whole:
        lines.append("whole: every shipped event of the window is in ClickHouse exactly once")
    if report.missing_count:
        lines.append(
            "repair: stop the consumer, drop its slot, then `python -m cdc_consumer backfill"
            f" --since T` with T at or before {report.earliest_missing_created_at}"
            " (docs/architecture.md, 'Proving the pipeline whole')"
        )
    return "\n".join(lines)


def _more(count: int, listed: int) -> list[str]:
    return [f"  ... and {count - listed} more"] if count > listed else []
