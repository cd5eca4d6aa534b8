-- The Sentry trace id the event was published under ('' when tracing was off), to follow a row
-- back to its request. A metadata-only ALTER: existing parts read the default.
ALTER TABLE event_log ADD COLUMN IF NOT EXISTS trace_id String DEFAULT '' AFTER metadata_version;
