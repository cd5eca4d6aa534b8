-- The analytics table: the brief's "one big table" plus the event's identity and its position
-- in the source WAL. Written only by cdc_consumer, one batched INSERT per flush.
--
-- Exactly-once without FINAL: the consumer skips, at startup, every row at or below the
-- highest (source_lsn, source_seq) already here (see docs/adr/0002-exactly-once.md).
-- ReplacingMergeTree on the event's identity is the second line of defence; the table-level
-- insert dedup window drops a retried insert whose bytes are identical to one that landed.
CREATE TABLE IF NOT EXISTS event_log
(
    event_id           UUID,
    event_type         LowCardinality(String),
    event_date_time    DateTime64(6, 'UTC'),
    environment        LowCardinality(String),
    event_context      JSON,                      -- queryable; ClickHouse normalises it
    event_context_raw  String CODEC(ZSTD(3)),     -- the jsonb text exactly as PostgreSQL stored it
    metadata_version   UInt64,
    source_lsn         UInt64,                    -- commit LSN of the PostgreSQL transaction
    source_seq         UInt32                     -- order of the event inside that transaction
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(event_date_time)
ORDER BY (event_type, event_date_time, event_id)
SETTINGS non_replicated_deduplication_window = 1000;
