"""`python -m cdc_consumer backfill --since T`: re-ship the gap from the outbox after a slot loss.

Exactly once, by construction rather than by merges:
- The slot is recreated here with an exported snapshot (`CREATE_REPLICATION_SLOT … (SNAPSHOT
  'export')`), and the outbox is read in that snapshot. Every row the snapshot sees committed
  before the new slot's starting point, and every row it does not see will stream through the
  new slot: the two sets are disjoint, so the consumer and the backfill never ship one event
  twice, whenever the consumer starts.
- The backfill claims its source and fences earlier runs first, as a consumer run does, so no
  insert of the run that lost the slot lands after the presence check.
- `--since` is a commit time: rows are chosen by their transaction's commit timestamp
  (`pg_xact_commit_timestamp(xmin)`, less a margin), not by `created_at`, which is taken when
  the transaction began: one that began before `since` and committed in the gap is in. A row
  whose commit time is unknown (committed while track_commit_timestamp was off, or older than
  the server keeps them) cannot be placed, so it is read too; the presence check below sorts
  it out.
- Rows whose event_id is already in event_log or event_log_dead_letter are skipped, whichever
  source wrote them, so rows the old slot did deliver (and a second backfill run, and the
  consumer a set of shards replaces: docs/operations.md, 'Several consumers') are not sent
  again. With CDC_SHARD only the shard's rows are read: the others are other consumers' own.
  Rows are read in publish-time order, so a chunk spans a short stretch of event_date_time:
  the check names that stretch, which ClickHouse finds through the partition key and the sort
  key (event_type, event_date_time, …; few event types) instead of reading every event_id.
- Rows go through the consumer's own encoder and sink worker (same bytes, same retries, same
  dead-lettering). Their source position is (0, 0): they have no LSN in the new slot's WAL
  history, and the consumer's restart read, which starts at the slot's confirmed position,
  never meets 0.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

import psycopg
import structlog
from psycopg import sql

from cdc_consumer import pgoutput, postgres, provisioning
from cdc_consumer.batch import Batch
from cdc_consumer.clickhouse import ClickHouseTransport, quote_string
from cdc_consumer.clickhouse_sink import SOURCES_TABLE, ClickHouseSink, stored_event_counts
from cdc_consumer.delivery import SinkWorker
from cdc_consumer.errors import ErrorKind, PipelineError
from cdc_consumer.event_log import EventLogEncoder
from cdc_consumer.outbox import OUTBOX_COLUMNS, OUTBOX_SCHEMA, OUTBOX_TABLE
from cdc_consumer.replication import identify
from cdc_consumer.settings import ConsumerSettings
from cdc_consumer.shard import Shard, outbox_condition
from cdc_consumer.sink import ORIGIN, SourceIdentity
from cdc_consumer.timeline import WalHistory

log = structlog.get_logger(__name__)

CHUNK_ROWS = 10_000
# Read from this long before `since`: commit timestamps come from the server's clock, `since`
# often from an operator's, and a row read twice costs only its presence check.
COMMIT_TIME_MARGIN = timedelta(minutes=1)
# The outbox columns the encoder needs, read as `::text`: the same text pgoutput sends.
_COLUMNS = OUTBOX_COLUMNS
# As a Relation message would describe them (every column text), for the consumer's encoder;
# the fsync benchmark encodes its rows through it too.
TEXT_RELATION = pgoutput.Relation(
    relation_id=0,
    namespace=OUTBOX_SCHEMA,
    name=OUTBOX_TABLE,
    replica_identity="d",
    columns=tuple(pgoutput.Column(0, name, 25, -1) for name in _COLUMNS),
)


# Whether the commit time is unknown, then the encoder's columns as text (the text pgoutput
# sends), in publish-time order (the presence check's time bounds come from it).
# Of a shard's rows only (CDC_SHARD): the others are another consumer's to ship.
def _select(shard: Shard | None) -> sql.Composed:
    return sql.SQL(
        "SELECT committed_at IS NULL, {columns} FROM {table} AS o,"
        " LATERAL (SELECT pg_xact_commit_timestamp(o.xmin) AS committed_at) AS c"
        " WHERE (committed_at >= %(since)s OR committed_at IS NULL) AND {shard}"
        " ORDER BY event_date_time, event_id"
    ).format(
        columns=sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(c)) for c in _COLUMNS),
        table=sql.Identifier(OUTBOX_SCHEMA, OUTBOX_TABLE),
        shard=outbox_condition(shard),
    )


@dataclass(frozen=True, slots=True)
class BackfillResult:
    slot: str
    since: str
    read_from: str  # commit time read from: `since` less COMMIT_TIME_MARGIN
    read: int  # outbox rows committed since then (or at an unknown time), before the new slot
    unknown_commit_time: int  # of those, rows whose commit time the server no longer knows
    skipped: int  # already in event_log or the dead-letter table
    shipped: int  # written by this run

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def backfill(
    settings: ConsumerSettings,
    transport: ClickHouseTransport,
    since: datetime,
    *,
    replaces: Sequence[str] = (),
) -> BackfillResult:
    """Recreate the (missing or lost) slot and ship outbox rows committed since `since` that
    ClickHouse does not hold. Refuses while the slot exists and is usable.

    `replaces`: the sources of consumers this one takes over from (the switch to shards,
    docs/operations.md 'Several consumers'). Each must have stopped and its slot be gone, so
    it can never stream those events again under its own name; each is fenced like an earlier
    run of this source, so no insert of it still executing lands after the presence check."""
    url = settings.database_url.get_secret_value()
    slot = settings.cdc_slot
    with postgres.connect(url, autocommit=True) as conn:
        provisioning.check_failover_supported(
            conn.info.server_version, failover=settings.cdc_slot_failover
        )
        _check_replaced(conn, transport, replaces, settings)
        _drop_lost_slot(conn, slot)
        provisioning.ensure_consumer_publication(conn, settings)
    options = (
        "SNAPSHOT 'export', FAILOVER true" if settings.cdc_slot_failover else "SNAPSHOT 'export'"
    )
    with postgres.connect(url, autocommit=True, replication="database") as replication:
        # Before the slot: the snapshot it exports lives until this connection's next command.
        identity, history = identify(replication, slot)
        created = replication.execute(
            f"CREATE_REPLICATION_SLOT {slot} LOGICAL pgoutput ({options})"
        ).fetchone()
        assert created is not None  # the command always answers one row
        log.info("replication slot recreated for backfill", slot=slot, lsn=created[1])
        # The exported snapshot lives until the replication connection runs another command
        # or closes, so everything is read inside this block.
        result = _ship(
            url,
            str(created[2]),
            since,
            transport,
            settings,
            identity=identity,
            history=history,
            replaces=replaces,
        )
    log.info("backfill done", **result.as_dict())
    return result


def _check_replaced(
    conn: psycopg.Connection[Any],
    transport: ClickHouseTransport,
    replaces: Sequence[str],
    settings: ConsumerSettings,
) -> None:
    for source in replaces:
        if source == settings.source:
            raise PipelineError(
                ErrorKind.CONFIGURATION,
                f"--replaces {source}: that is this consumer's own source",
                hint="a consumer that keeps its source resumes by itself; --replaces names"
                " the sources of other consumers this one takes over from",
            )
        # The newest record of the source: the slot it was last read through. On a cluster
        # cdc_sources is per shard, and the fence below claims the epoch on this one: the
        # host of CLICKHOUSE_URL must be of the shard the replaced consumer wrote to.
        rows = transport.select(
            f"SELECT argMax(slot, registered_at) FROM {SOURCES_TABLE}"
            f" WHERE source = {quote_string(source)} HAVING count() > 0"
        )
        if not rows:
            raise PipelineError(
                ErrorKind.CONFIGURATION,
                f"--replaces {source}: no consumer has written as that source"
                + (" on this ClickHouse shard" if settings.clickhouse_cluster else ""),
                hint="name the CDC_SOURCE (by default the slot's name) of each consumer this"
                " one takes over from"
                + (
                    "; on a cluster, point CLICKHOUSE_URL at a host of the shard it wrote to"
                    if settings.clickhouse_cluster
                    else ""
                ),
            )
        [[old_slot]] = rows
        if old_slot == settings.cdc_slot:
            raise PipelineError(
                ErrorKind.CONFIGURATION,
                f"--replaces {source}: it was read through {old_slot}, this consumer's own slot",
                hint="give the new consumers slots of their own (docs/operations.md, 'Several"
                " consumers')",
            )
        if conn.execute(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (old_slot,)
        ).fetchone():
            raise PipelineError(
                ErrorKind.CONFIGURATION,
                f"--replaces {source}: its slot {old_slot} still exists, so its consumer could"
                " stream the same events again under its own name",
                hint=f"stop that consumer, then SELECT pg_drop_replication_slot('{old_slot}')"
                " and run the backfill again (docs/operations.md, 'Several consumers')",
            )


def _drop_lost_slot(conn: psycopg.Connection[Any], slot: str) -> None:
    row = conn.execute(
        "SELECT active_pid, wal_status FROM pg_replication_slots WHERE slot_name = %s", (slot,)
    ).fetchone()
    if row is None:
        return
    pid, wal_status = row
    if pid is not None or wal_status != "lost":
        raise PipelineError(
            ErrorKind.CONFIGURATION,
            f"slot {slot} exists (wal_status {wal_status}, active pid {pid})",
            hint="backfill recreates a missing or lost slot: stop the consumer first; a"
            " healthy slot already delivers everything, so there is no gap to fill",
        )
    conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
    log.warning("lost replication slot dropped", slot=slot)


def _ship(
    url: str,
    snapshot: str,
    since: datetime,
    transport: ClickHouseTransport,
    settings: ConsumerSettings,
    *,
    identity: SourceIdentity,
    history: WalHistory,
    replaces: Sequence[str],
) -> BackfillResult:
    source = settings.source
    encoder = EventLogEncoder(TEXT_RELATION, source=source, timeline=history.timeline)
    sink = ClickHouseSink(transport, source=source, cluster=settings.clickhouse_cluster)
    # The source must be this server's; on a new timeline (after a failover) this repairs the
    # gap a fresh slot leaves, so the timeline is recorded whatever the slot's position.
    sink.check_source(identity, history, slot_lsn=None)
    # A consumer run that lost the slot may still have an insert executing: let it end before
    # the presence check reads what is there, or its rows would be shipped a second time.
    sink.fence_earlier_runs()
    for replaced in replaces:
        ClickHouseSink(
            transport, source=replaced, cluster=settings.clickhouse_cluster
        ).fence_earlier_runs()
        log.info("replaced source fenced", source=replaced)
    worker = SinkWorker(sink, retry_cap_seconds=30.0, slot=settings.cdc_slot)
    read = skipped = unknown = 0
    try:
        with postgres.connect(url) as conn:
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot)))
            with conn.cursor(name="backfill") as cursor:
                cursor.itersize = CHUNK_ROWS
                cursor.execute(_select(settings.cdc_shard), {"since": since - COMMIT_TIME_MARGIN})
                while chunk := cursor.fetchmany(CHUNK_ROWS):
                    read += len(chunk)
                    unknown += sum(1 for row in chunk if row[0])
                    rows = [row[1:] for row in chunk]
                    present = _present(transport, rows, cluster=settings.clickhouse_cluster)
                    fresh = [row for row in rows if row[_EVENT_ID] not in present]
                    skipped += len(rows) - len(fresh)
                    encoded = [
                        encoder.encode([_wire(value) for value in row], ORIGIN) for row in fresh
                    ]
                    if encoded:
                        _submit(worker, Batch(rows=encoded))
    finally:
        worker.stop(abort=worker.fatal is not None)
    if worker.fatal is not None:
        raise worker.fatal
    return BackfillResult(
        slot=settings.cdc_slot,
        since=since.isoformat(),
        read_from=(since - COMMIT_TIME_MARGIN).isoformat(),
        read=read,
        unknown_commit_time=unknown,
        skipped=skipped,
        shipped=read - skipped,
    )


_EVENT_ID = OUTBOX_COLUMNS.index("event_id")
_PUBLISHED = OUTBOX_COLUMNS.index("event_date_time")


def _present(
    transport: ClickHouseTransport,
    rows: Sequence[Sequence[str | None]],
    *,
    cluster: str | None,
) -> Collection[str]:
    """The event ids of a chunk (in publish-time order) that ClickHouse already holds, looked up
    within the chunk's stretch of event_date_time, which event_log finds by its partition and
    sort key instead of reading every event_id."""
    published = (
        datetime.fromisoformat(str(rows[0][_PUBLISHED])),
        datetime.fromisoformat(str(rows[-1][_PUBLISHED])),
    )
    event_ids = [str(row[_EVENT_ID]) for row in rows]
    return stored_event_counts(transport, event_ids, between=published, cluster=cluster).keys()


def _submit(worker: SinkWorker, batch: Batch) -> None:
    while not worker.submit(batch, timeout=1.0):
        if worker.fatal is not None:
            raise worker.fatal


def _wire(value: str | None) -> bytes | None:
    """A column's text as pgoutput would send it: bytes, or None for NULL."""
    return None if value is None else value.encode()
