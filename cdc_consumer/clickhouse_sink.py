"""`EventSink` over a ClickHouse transport: one INSERT per batch into event_log, and the
restart read that makes a replay exactly-once (docs/adr/0002-exactly-once-in-clickhouse.md).
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import count

from cdc_consumer.clickhouse import SUPERSEDED_MARK, ClickHouseTransport, quote_string
from cdc_consumer.clickhouse_cluster import on_cluster, sql_string
from cdc_consumer.errors import ErrorKind, PipelineError
from cdc_consumer.event_log import (
    DEAD_LETTER_COLUMNS,
    DEAD_LETTER_TABLE,
    EVENT_LOG_COLUMNS,
    EVENT_LOG_TABLE,
    dead_letter_record,
    unencodable_reason,
)
from cdc_consumer.pgoutput import lsn_to_str
from cdc_consumer.sink import SourceIdentity, StoredPositions
from cdc_consumer.timeline import WalHistory

SOURCES_TABLE = "cdc_sources"
RUNS_TABLE = "cdc_runs"
# Rows written before event_log recorded its source (sql/clickhouse/0004) carry ''. They can
# only be this deployment's own, so the restart read counts them as this source's.
LEGACY_SOURCE = ""

# What the exactly-once rule relies on, pinned whatever the server's user profile says:
# - a synchronous insert that is durable when it returns (an async one is not, unless waited);
# - the table's insert deduplication, so a retry of a batch that did land adds nothing;
# - one block per partition: the parser and the squashing step merge the whole batch (at most
#   CDC_BATCH_MAX_ROWS, under 1,048,576 rows) into one block, whatever the profile's minimums,
#   so a retry is cut into the same blocks and deduplicates block by block. A batch spanning
#   two months is still two parts committed apart: the restart read does not assume a prefix.
# - pgoutput sends timestamptz with a variable number of fractional digits and an offset
#   (`2026-11-25 07:49:31.12345+00`); ClickHouse parses it when told to make its best effort.
# - a NULL must fail the row rather than become an empty string or a zero: it is dead-lettered.
INSERT_SETTINGS: dict[str, str] = {
    "async_insert": "0",
    "insert_deduplicate": "1",
    "max_insert_block_size": "1048576",
    "min_insert_block_size_rows": "1048576",
    "min_insert_block_size_bytes": "0",
    "date_time_input_format": "best_effort",
    "input_format_null_as_default": "0",
}
# The same guarantees under names newer servers added (26.x: `deduplicate_insert` supersedes
# `insert_deduplicate`); sent only to a server that knows them, as older ones refuse them.
# The guarded insert is an INSERT ... SELECT FROM input(), whose deduplication 26.2+ decides by
# `deduplicate_insert_select` first: a profile with it off would let a retry land twice.
# `force_enable` deduplicates by the token, or fails the insert where it cannot, never doubles.
NEWER_INSERT_SETTINGS: dict[str, str] = {
    "deduplicate_insert": "enable",
    "deduplicate_insert_select": "force_enable",
    "use_strict_insert_block_limits": "0",
    "max_insert_block_size_bytes": "0",
}
# A profile limit must fail the restart read, never cut it short: a truncated read would
# under-count what is stored, and the replay would write those rows a second time.
RESTART_READ_SETTINGS: dict[str, str] = {
    "read_overflow_mode": "throw",
    "read_overflow_mode_leaf": "throw",
    "result_overflow_mode": "throw",
    "group_by_overflow_mode": "throw",
    "sort_overflow_mode": "throw",
    "distinct_overflow_mode": "throw",
    "set_overflow_mode": "throw",
    "join_overflow_mode": "throw",
    "transfer_overflow_mode": "throw",
    "timeout_overflow_mode": "throw",
    "timeout_overflow_mode_leaf": "throw",
}

# What the presence lookup (backfill, verify) pins besides: a lightweight-deleted row is gone.
PRESENCE_READ_SETTINGS: dict[str, str] = {**RESTART_READ_SETTINGS, "apply_deleted_mask": "1"}
# Event ids per presence lookup. Its two IN lists of quoted uuids (~39 bytes each, ~160 KB in
# all) stay under ClickHouse's default max_query_size (256 KiB), which bounds the query text
# and which the embedded engine cannot raise from inside the query.
LOOKUP_IDS = 2_000


@dataclass(frozen=True, slots=True)
class StoredCounts:
    """Physical rows one event has in each table, counted without FINAL, so a duplicate that a
    ReplacingMergeTree merge has not folded yet is counted."""

    event_log: int = 0
    dead_letter: int = 0


def stored_event_counts(
    transport: ClickHouseTransport,
    event_ids: Sequence[str],
    *,
    between: tuple[datetime, datetime] | None = None,
    cluster: str | None = None,
) -> dict[str, StoredCounts]:
    """What event_log and event_log_dead_letter hold of these events (uuid text), by event id;
    absent ids are left out. Whatever source wrote them: an event id names one event, so a row
    of it under another source (a shard's predecessor, a consumer moved to new slots) is that
    event delivered, and a second row of it is that event doubled. `between` bounds
    event_date_time (inclusive), which lets ClickHouse skip the partitions and granules outside
    it; rows of these events outside it are not counted. On a cluster (CLICKHOUSE_CLUSTER) every
    shard is read: the consumer that wrote an event may have written to another shard's hosts."""
    found: dict[str, StoredCounts] = {}
    for start in range(0, len(event_ids), LOOKUP_IDS):
        ids = event_ids[start : start + LOOKUP_IDS]
        query = stored_counts_sql(ids, between=between, cluster=cluster)
        for event_id, logged, dead in transport.select(query, PRESENCE_READ_SETTINGS):
            seen = found.get(str(event_id), StoredCounts())
            found[str(event_id)] = StoredCounts(
                seen.event_log + int(logged), seen.dead_letter + int(dead)
            )
    return found


def stored_counts_sql(
    event_ids: Sequence[str],
    *,
    between: tuple[datetime, datetime] | None = None,
    cluster: str | None = None,
) -> str:
    """One lookup of `stored_event_counts` (at most LOOKUP_IDS ids)."""
    event_log, dead_letter = (
        _every_shard(table, cluster) for table in (EVENT_LOG_TABLE, DEAD_LETTER_TABLE)
    )
    when = ""
    if between is not None:
        when = (
            f" AND event_date_time BETWEEN {_datetime64(between[0])} AND {_datetime64(between[1])}"
        )
    quoted = ",".join(f"'{uuid.UUID(event_id)}'" for event_id in event_ids)
    return (
        f"SELECT toString(event_id), count(), 0 FROM {event_log}"
        f" WHERE event_id IN ({quoted}){when} GROUP BY event_id"
        f" UNION ALL SELECT event_id, 0, count() FROM {dead_letter}"
        f" WHERE event_id IN ({quoted}) GROUP BY event_id"
    )


def _every_shard(table: str, cluster: str | None) -> str:
    """`table` of this database on every shard of `cluster` (one server: the table itself)."""
    if cluster is None:
        return table
    return f"cluster({sql_string(cluster)}, currentDatabase(), {table})"


def _datetime64(value: datetime) -> str:
    """A DateTime64(6, 'UTC') literal: event_log keeps the outbox's microseconds exactly."""
    text = value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
    return f"toDateTime64('{text}', 6, 'UTC')"


class ClickHouseSink:
    """`EventSink` for one source (a slot of one PostgreSQL), over a transport.

    Fencing, so that no write of an earlier run lands once a new run has read what is stored:
    - every run claims the next epoch of its source in `cdc_runs` when it starts streaming,
      and every insert it sends carries a guard the server checks as the insert starts: the
      source's newest epoch is still this run's. A run frozen past wal_sender_timeout (a
      paused VM) that wakes and sends a queued batch is refused (code 395, SUPERSEDED);
    - every insert carries the query id `cdc-<source>-<run>-<n>`, and the new run KILLs (SYNC)
      its predecessors' inserts that are still executing, which passed their guard before
      the claim. Source names are identifiers (no `-`), so one source's prefix never matches
      another's ids.
    """

    def __init__(
        self, transport: ClickHouseTransport, *, source: str, cluster: str | None = None
    ) -> None:
        self._transport = transport
        # A killed run may have written through another host of the cluster.
        self._kill_on = f" {on_cluster(cluster)}" if cluster else ""
        self._source = source
        self._source_literal = quote_string(source)
        self._source_prefix = f"cdc-{source}-"
        self._run_prefix = self._new_run_prefix()
        self._inserts = count(1)
        self._guard: str | None = None  # set once this run has claimed its epoch
        self._insert_settings: dict[str, str] | None = None
        self._legacy_timeline = 0  # set by check_source: rows without a timeline were read on it

    def _new_run_prefix(self) -> str:
        return f"{self._source_prefix}{uuid.uuid4().hex}-"

    def _settings(self) -> dict[str, str]:
        if self._insert_settings is None:
            names = ", ".join(quote_string(name) for name in NEWER_INSERT_SETTINGS)
            known = {
                str(row[0])
                for row in self._transport.select(
                    f"SELECT name FROM system.settings WHERE name IN ({names})"
                )
            }
            newer = {k: v for k, v in NEWER_INSERT_SETTINGS.items() if k in known}
            self._insert_settings = {**INSERT_SETTINGS, **newer}
        return self._insert_settings

    def _insert(self, table: str, columns: Sequence[str], rows: list[bytes]) -> None:
        # The token makes a retry of these exact bytes a duplicate ClickHouse drops, also for
        # the INSERT ... SELECT a guard turns the insert into (whose blocks it cannot hash).
        # It hashes the rows as the body holds them, newline-separated, without joining them:
        # the transport joins them once, behind its statement.
        token = hashlib.blake2b(digest_size=16)
        for n, row in enumerate(rows):
            if n:
                token.update(b"\n")
            token.update(row)
        self._transport.insert(
            table,
            rows,
            columns=columns,
            query_id=f"{self._run_prefix}{next(self._inserts)}",
            settings={**self._settings(), "insert_deduplication_token": token.hexdigest()},
            guard=self._guard,
        )

    def write(self, rows: list[bytes]) -> None:
        reason = unencodable_reason(rows)
        if reason is not None:
            raise PipelineError(
                ErrorKind.POISON_EVENT,
                f"the row cannot be encoded for clickhouse: {reason}",
                hint="it is isolated into event_log_dead_letter with its bytes escaped; the"
                " source database holds text that is not UTF-8",
            )
        self._insert(EVENT_LOG_TABLE, EVENT_LOG_COLUMNS, rows)

    def write_dead_letters(self, rows: list[bytes], error: str, *, minimal: bool = False) -> None:
        records = [dead_letter_record(row, error, self._source, minimal=minimal) for row in rows]
        self._insert(DEAD_LETTER_TABLE, DEAD_LETTER_COLUMNS, records)

    def fence_earlier_runs(self) -> None:
        # A ClickHouse server finishes an insert whose client died once it has the whole body.
        # If an earlier run's insert were still executing, the restart read next would miss
        # rows that land a moment later, and the replay would send them again in a batch cut
        # differently, which insert deduplication does not recognise. The claim makes every
        # later insert of an earlier run fail its guard; KILL ... SYNC then cancels those
        # already past it, or waits for them to finish, before it returns. A new run prefix
        # per claim fences this process's own inserts of an abandoned connection too.
        self._run_prefix = self._new_run_prefix()
        rows = self._transport.select(
            f"SELECT max(epoch) FROM {RUNS_TABLE} WHERE source = {self._source_literal}"
        )
        epoch = int(rows[0][0]) + 1 if rows else 1
        self._transport.command(
            f"INSERT INTO {RUNS_TABLE} (source, epoch, run) VALUES"
            f" ({self._source_literal}, {epoch}, {quote_string(self._run_prefix)})"
        )
        refusal = quote_string(f"{SUPERSEDED_MARK} {self._source}")
        self._guard = (
            f"throwIf((SELECT max(epoch) FROM {RUNS_TABLE} WHERE source = {self._source_literal})"
            f" != {epoch}, {refusal}) = 0"
        )
        self._transport.command(
            f"KILL QUERY{self._kill_on} WHERE startsWith(query_id, '{self._source_prefix}')"
            f" AND NOT startsWith(query_id, '{self._run_prefix}') SYNC"
        )

    def check_source(
        self, identity: SourceIdentity, history: WalHistory, *, slot_lsn: int | None
    ) -> None:
        """Record which PostgreSQL this source reads and on which timeline, or refuse:
        positions of another server's WAL are not comparable, and after a timeline change the
        slot resumes the source only from a position its history vouches for
        (`WalHistory.resume_refusal`). `slot_lsn` None (the backfill, which re-ships the gap
        itself) accepts any timeline."""
        rows = self._transport.select(
            "SELECT system_identifier, database, slot, timeline, legacy_timeline"
            f" FROM {SOURCES_TABLE} FINAL WHERE source = {self._source_literal}"
        )
        if not rows:
            self._record_source(identity, history.timeline, legacy=history.timeline)
            return
        system_identifier, database, slot, recorded_timeline, recorded_legacy = rows[0]
        recorded = SourceIdentity(str(system_identifier), str(database), str(slot))
        if recorded != identity:
            raise PipelineError(
                ErrorKind.CONFIGURATION,
                f"source {self._source} was recorded from PostgreSQL system"
                f" {recorded.system_identifier} database {recorded.database} slot"
                f" {recorded.slot}, but this is system {identity.system_identifier} database"
                f" {identity.database} slot {identity.slot}",
                hint="give each slot its own CDC_SOURCE, or point DATABASE_URL and CDC_SLOT"
                " at the server and slot this source was read from; after a major-version"
                " upgrade (a new system identifier) run `python -m cdc_consumer adopt`"
                " (docs/runbook-failover.md)",
            )
        # A row recorded before timelines were (sql/clickhouse/0006) holds 0 for both: its
        # rows are taken to be from the timeline this run finds, which is what the consumer
        # assumed before.
        last = int(recorded_timeline) or history.timeline
        legacy = int(recorded_legacy) or history.timeline
        refusal = None if slot_lsn is None else history.resume_refusal(last, slot_lsn)
        if refusal is not None:
            raise PipelineError(
                ErrorKind.CONFIGURATION,
                f"source {self._source} {refusal}",
                hint="with the consumer stopped, drop the slot and run `python -m cdc_consumer"
                " backfill --since <a little before last_shipped_commit_time in `status`>`,"
                " which recreates it, re-ships what ClickHouse lacks and records the new"
                " timeline (docs/runbook-failover.md)",
            )
        self._legacy_timeline = legacy
        if (int(recorded_timeline), int(recorded_legacy)) != (history.timeline, legacy):
            self._record_source(identity, history.timeline, legacy=legacy)

    def adopt_source(
        self, identity: SourceIdentity, history: WalHistory, *, slot_lsn: int
    ) -> dict[str, object]:
        """Record this server and slot as the source's from now on (after pg_upgrade gave it a
        new system identifier), only if no position the source stored is at or above the
        slot's (`slot_lsn`). The restart read starts at the slot's confirmed position, which
        only moves forward, so it can then never meet a position of the old WAL; otherwise
        one could be mistaken for a new event and skip it."""
        where = f"source IN ({self._source_literal}, {quote_string(LEGACY_SOURCE)})"
        rows = self._transport.select(
            f"SELECT max(lsn) FROM (SELECT max(source_lsn) AS lsn FROM {EVENT_LOG_TABLE}"
            f" WHERE {where} UNION ALL SELECT max(source_lsn) AS lsn FROM {DEAD_LETTER_TABLE}"
            f" WHERE {where})",
            RESTART_READ_SETTINGS,
        )
        highest = int(rows[0][0]) if rows and rows[0][0] is not None else 0
        if highest >= slot_lsn:
            raise PipelineError(
                ErrorKind.CONFIGURATION,
                f"source {self._source} holds positions up to {lsn_to_str(highest)}, at or"
                f" above slot {identity.slot}'s {lsn_to_str(slot_lsn)} on this server: a"
                " restart could mistake them for this server's events and skip those",
                hint="adopt only a server whose WAL continues past the old one (pg_upgrade"
                " does); otherwise give the consumer a new CDC_SOURCE and backfill"
                " (docs/runbook-failover.md)",
            )
        recorded = self._transport.select(
            f"SELECT system_identifier FROM {SOURCES_TABLE} FINAL"
            f" WHERE source = {self._source_literal}"
        )
        self._record_source(identity, history.timeline, legacy=history.timeline)
        return {
            "source": self._source,
            "previous_system_identifier": str(recorded[0][0]) if recorded else None,
            "system_identifier": identity.system_identifier,
            "database": identity.database,
            "slot": identity.slot,
            "timeline": history.timeline,
            "slot_lsn": lsn_to_str(slot_lsn),
            "highest_stored_lsn": lsn_to_str(highest),
        }

    def _record_source(self, identity: SourceIdentity, timeline: int, *, legacy: int) -> None:
        # cdc_sources keeps the newest row per source (ReplacingMergeTree on registered_at).
        self._legacy_timeline = legacy
        self._transport.command(
            f"INSERT INTO {SOURCES_TABLE}"
            " (source, system_identifier, database, slot, timeline, legacy_timeline)"
            f" VALUES ({self._source_literal}, {quote_string(identity.system_identifier)},"
            f" {quote_string(identity.database)}, {quote_string(identity.slot)},"
            f" {int(timeline)}, {int(legacy)})"
        )

    def stored_positions(self, since_lsn: int, history: WalHistory) -> StoredPositions:
        """What either table holds for this source at or above `since_lsn`, as runs of
        consecutive source_seq per transaction; positions `history` does not vouch for are
        only counted."""
        rows = self._transport.select(
            self.restart_read_sql(since_lsn, history), RESTART_READ_SETTINGS
        )
        ranges: dict[int, list[tuple[int, int]]] = {}
        untrusted = 0
        for lsn, trusted, first, last in rows:
            if int(trusted):
                ranges.setdefault(int(lsn), []).append((int(first), int(last)))
            else:
                untrusted += int(last) - int(first) + 1
        return StoredPositions(since_lsn, ranges, untrusted=untrusted)

    def restart_read_sql(self, since_lsn: int, history: WalHistory) -> str:
        """The restart read. The skip index on source_lsn (sql/clickhouse/0004) keeps it
        proportional to the rows at or above `since_lsn`, not to the size of event_log."""
        where = (
            f"source IN ({self._source_literal}, {quote_string(LEGACY_SOURCE)})"
            f" AND source_lsn >= {int(since_lsn)}"
        )
        trusted = self._trusted_sql(history)
        return (
            "SELECT source_lsn, trusted, min(source_seq), max(source_seq) FROM ("
            " SELECT source_lsn, trusted, source_seq, toInt64(source_seq) - row_number()"
            " OVER (PARTITION BY source_lsn, trusted ORDER BY source_seq) AS run"
            " FROM (SELECT DISTINCT source_lsn, source_seq, trusted FROM ("
            f" SELECT source_lsn, source_seq, {trusted} AS trusted FROM {EVENT_LOG_TABLE}"
            f" WHERE {where} UNION ALL SELECT source_lsn, source_seq, {trusted} AS trusted"
            f" FROM {DEAD_LETTER_TABLE} WHERE {where})))"
            " GROUP BY source_lsn, trusted, run ORDER BY source_lsn, min(source_seq)"
        )

    def _trusted_sql(self, history: WalHistory) -> str:
        """`WalHistory.trusts` over a row's timeline and LSN, as a ClickHouse expression; rows
        without a timeline count as read on the legacy one."""
        legacy = self._legacy_timeline or history.timeline
        timeline = f"if(source_timeline = 0, {int(legacy)}, source_timeline)"
        terms = [f"{timeline} = {int(history.timeline)}"] + [
            f"({timeline} = {int(ancestor)} AND source_lsn < {int(switchpoint)})"
            for ancestor, switchpoint in sorted(history.left_at.items())
        ]
        return f"toUInt8({' OR '.join(terms)})"

    def close(self) -> None:
        self._transport.close()
