-- Which source (a slot of one PostgreSQL, CDC_SOURCE) each row came from, so several sources
-- can share event_log: the restart read, the fence and the backfill's presence check are
-- scoped to one source. Rows written before this file read '' (counted as the deployment's
-- own by the restart read). A metadata-only ALTER.
ALTER TABLE event_log ADD COLUMN IF NOT EXISTS source LowCardinality(String) DEFAULT '' AFTER trace_id;
ALTER TABLE event_log_dead_letter ADD COLUMN IF NOT EXISTS source LowCardinality(String) DEFAULT '' FIRST;
-- A retried dead-letter insert whose first attempt landed (its answer lost) is dropped, as in
-- event_log: every insert carries a token of its bytes.
ALTER TABLE event_log_dead_letter MODIFY SETTING non_replicated_deduplication_window = 1000;

-- The restart read asks only for positions at or above the slot's confirmed position. event_log
-- is sorted by (event_type, event_date_time, event_id), and commit order follows publish time
-- closely, so a min/max of source_lsn per granule lets that read skip every granule below the
-- position instead of scanning the table (docs/benchmarks.md, "Restart read").
ALTER TABLE event_log ADD INDEX IF NOT EXISTS event_log_source_lsn_idx source_lsn TYPE minmax GRANULARITY 1;
-- Builds the index for parts written before it existed (a background mutation); until it is
-- done those parts are read whole, which is slower, never wrong.
ALTER TABLE event_log MATERIALIZE INDEX event_log_source_lsn_idx;

-- One row per source: the PostgreSQL and slot it reads (system identifier from IDENTIFY_SYSTEM,
-- the database, the slot). A consumer whose server or slot differs from the one recorded
-- refuses to start: LSNs of two WAL histories are not comparable, and two slots (row filters)
-- number the rows of one transaction differently.
CREATE TABLE IF NOT EXISTS cdc_sources
(
    source             String,
    system_identifier  String,
    database           String,
    slot               String,
    registered_at      DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(registered_at)
ORDER BY source;
