"""The ClickHouse side's ceiling for the drain benchmark: the same encoded batches the consumer
would send, inserted directly through the consumer's own write path (`ClickHouseSink.write`:
the guarded `INSERT ... SELECT FROM input()` with its token and settings), one after another,
with no consumer around them.

The batches are built here, before anything is timed, by reading a slot of their own over the
same WAL and encoding each insert with the consumer's `EventLogEncoder`, cut every
`batch_rows` rows as the consumer's default batches are (the transactions are far smaller).
"""

from __future__ import annotations

import time

from cdc_consumer import clickhouse, pgoutput
from cdc_consumer.clickhouse_sink import ClickHouseSink
from cdc_consumer.event_log import EventLogEncoder
from cdc_consumer.outbox import OUTBOX_TABLE
from cdc_consumer.replication import Keepalive, ReplicationStream
from cdc_consumer.sink import SourcePosition

SOURCE = "bench_ceiling"
_QUIET_LIMIT_SECONDS = 120.0


def encoded_batches(
    database_url: str, *, slot: str, publication: str, until_lsn: int, batch_rows: int
) -> list[list[bytes]]:
    """Every outbox insert of `slot` up to `until_lsn`, encoded, in batches of `batch_rows`."""
    stream = ReplicationStream.connect(database_url, slot, publication)
    batches: list[list[bytes]] = [[]]
    encoder: EventLogEncoder | None = None
    commit_lsn, seq = 0, 0
    try:
        stream.start()
        quiet_since = time.monotonic()
        while True:
            message = stream.read(1.0)
            if message is None:
                # The walsender may take a while to reach the first change of a long backlog.
                if time.monotonic() - quiet_since > _QUIET_LIMIT_SECONDS:
                    raise RuntimeError(f"the WAL ended before {pgoutput.lsn_to_str(until_lsn)}")
                continue
            quiet_since = time.monotonic()
            if isinstance(message, Keepalive):
                if message.wal_end >= until_lsn and not batches[-1]:
                    break
                continue
            decoded = pgoutput.decode(message.payload)
            if isinstance(decoded, pgoutput.Relation) and decoded.name == OUTBOX_TABLE:
                encoder = EventLogEncoder(decoded, source=SOURCE, timeline=1)
            elif isinstance(decoded, pgoutput.Begin):
                commit_lsn, seq = decoded.final_lsn, 0
            elif isinstance(decoded, pgoutput.Insert) and encoder is not None:
                batches[-1].append(encoder.encode(decoded.new, SourcePosition(commit_lsn, seq)))
                seq += 1
                if len(batches[-1]) >= batch_rows:
                    batches.append([])
            elif isinstance(decoded, pgoutput.Commit) and decoded.end_lsn >= until_lsn:
                break
    finally:
        stream.close()
    return [batch for batch in batches if batch]


def ingest_seconds(clickhouse_url: str, batches: list[list[bytes]]) -> float:
    """Seconds ClickHouse takes to take `batches`, one insert each, through the sink's write
    path (into the migrated event_log at `clickhouse_url`, under a source of its own)."""
    transport = clickhouse.connect(clickhouse_url)
    sink = ClickHouseSink(transport, source=SOURCE)
    try:
        sink.fence_earlier_runs()  # claims an epoch: the guard every insert then carries
        started = time.perf_counter()
        for rows in batches:
            sink.write(rows)
        return time.perf_counter() - started
    finally:
        sink.close()
