"""`python -m cdc_consumer backfill --since T`: re-ship the gap from the outbox after a slot loss.

Exactly once, by construction rather than by merges:
- The slot is recreated here with an exported snapshot (`CREATE_REPLICATION_SLOT … (SNAPSHOT
  'export')`), and the outbox is read in that snapshot. Every row the snapshot sees committed
  before the new slot's starting point, and every row it does not see will stream through the
  new slot: the two sets are disjoint, so the consumer and the backfill never ship one event
  twice, whenever the consumer starts.
- The backfill claims its source and fences earlier runs first, as a consumer run does, so no
  insert of the run that lost the slot lands after the presence check.
- Rows whose event_id is already in event_log or event_log_dead_letter for this source are
  skipped, so rows the old slot did deliver (and a second backfill run) are not sent again.
- Rows go through the consumer's own encoder and sink worker (same bytes, same retries, same
  dead-lettering). Their source position is (0, 0): they have no LSN in the new slot's WAL
  history, and the consumer's restart read, which starts at the slot's confirmed position,
  never meets 0.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import psycopg
import structlog
from psycopg import sql

from cdc_consumer import pgoutput, postgres, provisioning
from cdc_consumer.batch import Batch
from cdc_consumer.clickhouse import ClickHouseTransport, quote_string
from cdc_consumer.clickhouse_sink import LEGACY_SOURCE, ClickHouseSink
from cdc_consumer.delivery import SinkWorker
from cdc_consumer.errors import ErrorKind, PipelineError
from cdc_consumer.event_log import DEAD_LETTER_TABLE, EVENT_LOG_TABLE, EventLogEncoder
from cdc_consumer.outbox import OUTBOX_COLUMNS, OUTBOX_TABLE
from cdc_consumer.replication import identify
from cdc_consumer.settings import ConsumerSettings
from cdc_consumer.sink import ORIGIN, SourceIdentity
from cdc_consumer.timeline import WalHistory

log = structlog.get_logger(__name__)

CHUNK_ROWS = 10_000
# The outbox columns the encoder needs, read as `::text`: the same text pgoutput sends.
_COLUMNS = OUTBOX_COLUMNS
_RELATION = pgoutput.Relation(
    relation_id=0,
    namespace="public",
    name=OUTBOX_TABLE,
    replica_identity="d",
    columns=tuple(pgoutput.Column(0, name, 25, -1) for name in _COLUMNS),
)


@dataclass(frozen=True, slots=True)
class BackfillResult:
    slot: str
    since: str
    read: int  # outbox rows created at or after `since`, visible before the new slot
    skipped: int  # already in event_log or the dead-letter table
    shipped: int  # written by this run

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def backfill(
    settings: ConsumerSettings, transport: ClickHouseTransport, since: datetime
) -> BackfillResult:
    """Recreate the (missing or lost) slot and ship outbox rows created since `since` that
    ClickHouse does not hold. Refuses while the slot exists and is usable."""
    url = settings.database_url.get_secret_value()
    slot = settings.cdc_slot
    with postgres.connect(url, autocommit=True) as conn:
        provisioning.check_failover_supported(
            conn.info.server_version, failover=settings.cdc_slot_failover
        )
        _drop_lost_slot(conn, slot)
        provisioning.ensure_publication(conn, settings.cdc_publication)
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
            url, str(created[2]), since, transport, settings, identity=identity, history=history
        )
    log.info("backfill done", **result.as_dict())
    return result


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
) -> BackfillResult:
    source = settings.source
    encoder = EventLogEncoder(_RELATION, source=source, timeline=history.timeline)
    sink = ClickHouseSink(transport, source=source, cluster=settings.clickhouse_cluster)
    # The source must be this server's; on a new timeline (after a failover) this repairs the
    # gap a fresh slot leaves, so the timeline is recorded whatever the slot's position.
    sink.check_source(identity, history, slot_lsn=None)
    # A consumer run that lost the slot may still have an insert executing: let it end before
    # the presence check reads what is there, or its rows would be shipped a second time.
    sink.fence_earlier_runs()
    worker = SinkWorker(sink, retry_cap_seconds=30.0)
    read = skipped = 0
    try:
        with postgres.connect(url) as conn:
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot)))
            query = sql.SQL(
                "SELECT {columns} FROM {table} WHERE created_at >= %s ORDER BY created_at, event_id"
            ).format(
                columns=sql.SQL(", ").join(
                    sql.SQL("{}::text").format(sql.Identifier(c)) for c in _COLUMNS
                ),
                table=sql.Identifier(OUTBOX_TABLE),
            )
            with conn.cursor(name="backfill") as cursor:
                cursor.itersize = CHUNK_ROWS
                cursor.execute(query, (since,))
                while rows := cursor.fetchmany(CHUNK_ROWS):
                    read += len(rows)
                    present = _present(transport, source, [row[0] for row in rows])
                    fresh = [row for row in rows if row[0] not in present]
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
        read=read,
        skipped=skipped,
        shipped=read - skipped,
    )


def _present(transport: ClickHouseTransport, source: str, event_ids: list[str]) -> set[str]:
    """The event ids of this chunk that ClickHouse already holds for this source, delivered or
    dead-lettered."""
    quoted = ",".join(f"'{event_id}'" for event_id in event_ids)  # uuid text: no quotes inside
    sources = f"source IN ({quote_string(source)}, {quote_string(LEGACY_SOURCE)})"
    rows = transport.select(
        f"SELECT toString(event_id) FROM {EVENT_LOG_TABLE}"
        f" WHERE {sources} AND event_id IN ({quoted})"
        f" UNION ALL SELECT event_id FROM {DEAD_LETTER_TABLE}"
        f" WHERE {sources} AND event_id IN ({quoted})"
    )
    return {str(row[0]) for row in rows}


def _submit(worker: SinkWorker, batch: Batch) -> None:
    while not worker.submit(batch, timeout=1.0):
        if worker.fatal is not None:
            raise worker.fatal


def _wire(value: str | None) -> bytes | None:
    """A column's text as pgoutput would send it: bytes, or None for NULL."""
    return None if value is None else value.encode()
