-- Events ClickHouse refused (a context the JSON type rejects, a NULL where event_log has none):
-- the row exactly as the consumer tried to insert it, and the error. Rows land here in source
-- order, so the consumer's restart watermark counts them as delivered and never skips past an
-- event that is in neither table. Replay one after fixing the cause by inserting `row` back
-- into event_log (FORMAT JSONEachRow).
CREATE TABLE IF NOT EXISTS event_log_dead_letter
(
    source_lsn  UInt64,
    source_seq  UInt32,
    event_id    String,                   -- as sent; may itself be what was wrong
    row         String CODEC(ZSTD(3)),    -- the JSONEachRow line, including the raw context
    error       String,
    failed_at   DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = MergeTree
ORDER BY (source_lsn, source_seq);
