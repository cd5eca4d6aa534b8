-- The Sentry trace of the request that published the event, NULL when tracing was off, so a
-- row in event_log can be followed back to the request that produced it. A nullable column
-- without a default is a catalog-only change: no rewrite, no long lock on a busy outbox.
ALTER TABLE event_outbox ADD COLUMN IF NOT EXISTS trace_id text;
