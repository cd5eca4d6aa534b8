-- The transactional outbox. The web app inserts one row per event inside its own transaction;
-- the consumer reads those inserts from the WAL (pgoutput), never by polling this table.
-- Insert-only by contract: rows are never updated, so every WAL tuple carries full values
-- (no unchanged-TOAST placeholders), and pruning DELETEs are not published to the slot.
CREATE TABLE IF NOT EXISTS event_outbox (
    event_id          uuid        PRIMARY KEY,          -- time-ordered (UUIDv7), set by publish()
    event_type        text        NOT NULL,
    event_date_time   timestamptz NOT NULL,             -- the moment of publishing, UTC
    environment       text        NOT NULL,
    event_context     jsonb       NOT NULL,
    metadata_version  bigint      NOT NULL CHECK (metadata_version >= 0),
    created_at        timestamptz NOT NULL DEFAULT now()
);

-- Pruning deletes by age; this keeps it an index range scan.
CREATE INDEX IF NOT EXISTS event_outbox_created_at_idx ON event_outbox (created_at);
