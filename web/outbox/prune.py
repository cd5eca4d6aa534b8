"""`outbox_prune`: delete outbox rows past the retention that are provably in ClickHouse.

The rule (why `created_at` alone is not enough): the slot ships transactions in commit order,
but `created_at` is taken at INSERT, before the commit. A transaction that stays open for a
while has an old `created_at` and commits after newer rows that have already shipped, so
"created before the last shipped commit" does not prove a row shipped. What does: the row's
own commit time. With `track_commit_timestamp = on` (postgres.conf), `pg_xact_commit_timestamp
(xmin)` is the very timestamp pgoutput sends in that transaction's Commit message, and the
consumer records the newest shipped one in `cdc_progress.last_commit_time`. A row is deleted
only when

    created_at < now - OUTBOX_RETENTION
    and pg_xact_commit_timestamp(xmin) <= last_commit_time - OUTBOX_PRUNE_COMMIT_MARGIN

The margin covers the one way commit-time order and commit (WAL) order can disagree: a
backend takes its commit timestamp just before it writes the commit record, so two commits
racing within microseconds can be stamped in one order and logged in the other (and the
server clock may step).

A row's commit time is not always known: it is NULL for a transaction committed while
track_commit_timestamp was off, and for one older than the server's commit-timestamp horizon,
which follows the freeze horizon (days at a busy site). Such rows go by a second rule, which
needs no timestamps: the slot's `catalog_xmin`. PostgreSQL moves it to the oldest transaction
still running at a running-transactions record the slot has been confirmed past, so every
older transaction had committed (or aborted) before a position the consumer confirmed, which
it only confirms once ClickHouse holds everything before it. A row is also deleted when

    created_at < now - OUTBOX_RETENTION
    and age(xmin) > age(catalog_xmin)

(`age` counts back from the current transaction id, so both are compared in one statement,
wraparound and all; a raw xmin more than 2^31 transactions old reads negative, and is older
than any live slot's catalog_xmin, which holds back freezing.) It trails the commit-time rule
while a long transaction anywhere on the server is open, so it is the second rule, not the
only one.

A slot of this database that streams the outbox (it records progress in cdc_progress, or a
publication's record names it) but is missing from OUTBOX_SLOTS (a shard left out of it) stops
the prune: it cannot wait for a slot it was not told of.

With several slots on one outbox (OUTBOX_SLOTS), both rules hold for every one of them: the
oldest of their shipped commits, and each one's catalog_xmin. Pruning also stops while any of
them is missing or lost: the backfill that repairs a lost slot
reads the outbox, so the outbox must outlive the gap (see docs/architecture.md, operations).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import structlog
from django.db import connection
from django.db.models import BooleanField, DateTimeField, Q
from django.db.models.expressions import RawSQL
from django.utils import timezone

from web.outbox.models import CdcProgress, EventOutbox
from web.outbox.slot import outbox_slot_report, outbox_unlisted_slots

log = structlog.get_logger(__name__)

_COMMITTED_AT = RawSQL('pg_xact_commit_timestamp("event_outbox"."xmin")', (), DateTimeField())


def _finished_before(catalog_xmin: str) -> RawSQL:
    """Whether the row's transaction is older than the slot's catalog_xmin."""
    return RawSQL(
        'age("event_outbox"."xmin") > age(%s::xid) OR age("event_outbox"."xmin") < 0',
        (catalog_xmin,),
        BooleanField(),
    )


@dataclass(frozen=True, slots=True)
class PruneResult:
    deleted: int
    chunks: int
    skipped_reason: str | None = None


def outbox_prune(
    *, slots: Sequence[str], retention: timedelta, commit_margin: timedelta, chunk_rows: int
) -> PruneResult:
    """Delete rows older than `retention` that every one of `slots` has shipped, in chunks of
    `chunk_rows`, each chunk its own short autocommit DELETE by primary key; returns how many
    went. Several slots stream one outbox when consumers split it or one replaces another:
    a row goes only by the slowest one's progress."""
    unlisted = outbox_unlisted_slots(slots)
    if unlisted:
        left_out = (
            f"slot {', '.join(unlisted)} streams this outbox (it records progress) but is not in"
            " OUTBOX_SLOTS, so the prune cannot wait for it: list it, or drop it if it is done"
        )
        log.warning("outbox prune skipped", slots=unlisted, reason=left_out)
        return PruneResult(deleted=0, chunks=0, skipped_reason=left_out)
    for slot in slots:
        reason = _unsafe_to_prune(slot)
        if reason is not None:
            log.warning("outbox prune skipped", slot=slot, reason=reason)
            return PruneResult(deleted=0, chunks=0, skipped_reason=reason)
    shipped = dict(
        CdcProgress.objects.filter(slot__in=slots).values_list("slot", "last_commit_time")
    )
    commit_times = [shipped.get(slot) for slot in slots]
    if None in commit_times:
        reason = "the consumer has not recorded a shipped commit for this slot yet"
        log.info("outbox prune skipped", slot=slots[commit_times.index(None)], reason=reason)
        return PruneResult(deleted=0, chunks=0, skipped_reason=reason)
    last_commit_time = min(time for time in commit_times if time is not None)
    old_rows = EventOutbox.objects.filter(created_at__lt=timezone.now() - retention).alias(
        committed_at=_COMMITTED_AT
    )
    shipped_rows = Q(committed_at__lte=last_commit_time - commit_margin)
    catalog_xmins = [_catalog_xmin(slot) for slot in slots]
    if all(xmin is not None for xmin in catalog_xmins):
        finished = Q()
        for n, catalog_xmin in enumerate(catalog_xmins):
            name = f"finished_before_slot_{n}"
            old_rows = old_rows.alias(**{name: _finished_before(str(catalog_xmin))})
            finished &= Q(**{name: True})
        shipped_rows |= finished
    candidates = (
        old_rows.filter(shipped_rows).order_by("created_at").values_list("event_id", flat=True)
    )
    deleted = chunks = 0
    while ids := list(candidates[:chunk_rows]):
        removed, _ = EventOutbox.objects.filter(event_id__in=ids).delete()
        deleted += removed
        chunks += 1
    log.info(
        "outbox pruned",
        slots=list(slots),
        deleted=deleted,
        chunks=chunks,
        shipped_until=last_commit_time.isoformat(),
        catalog_xmins=catalog_xmins,
    )
    return PruneResult(deleted=deleted, chunks=chunks)


def _catalog_xmin(slot: str) -> str | None:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT catalog_xmin::text FROM pg_replication_slots WHERE slot_name = %s", [slot]
        )
        row = cursor.fetchone()
    return None if row is None or row[0] is None else str(row[0])


def _unsafe_to_prune(slot: str) -> str | None:
    with connection.cursor() as cursor:
        cursor.execute("SHOW track_commit_timestamp")
        row = cursor.fetchone()
    if row is None or row[0] != "on":
        return "track_commit_timestamp is off: shipped rows cannot be told apart (postgres.conf)"
    report = outbox_slot_report(slot=slot)
    if not report.exists or report.wal_status == "lost":
        return "the slot is missing or lost: the outbox is kept for the backfill"
    return None
