-- The PostgreSQL timeline each row was read on (IDENTIFY_SYSTEM), so that after a failover the
-- restart read skips only positions the new primary's WAL history shares: promoting a standby
-- starts a new timeline that reuses the LSNs past its switchpoint for other transactions
-- (cdc_consumer/timeline.py). Rows written before this file read 0: they count as read on
-- cdc_sources.legacy_timeline. Metadata-only ALTERs.
ALTER TABLE event_log ADD COLUMN IF NOT EXISTS source_timeline UInt32 DEFAULT 0 AFTER source;
ALTER TABLE event_log_dead_letter ADD COLUMN IF NOT EXISTS source_timeline UInt32 DEFAULT 0 AFTER source;
-- The timeline the source was last read on; a run on another one resumes only from a slot
-- position that timeline's history vouches for. legacy_timeline is the timeline the first run
-- after this file found, which rows without one (0) are taken to be from.
ALTER TABLE cdc_sources ADD COLUMN IF NOT EXISTS timeline UInt32 DEFAULT 0;
ALTER TABLE cdc_sources ADD COLUMN IF NOT EXISTS legacy_timeline UInt32 DEFAULT 0;
