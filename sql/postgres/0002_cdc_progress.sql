-- What the consumer has shipped, one row per slot, written after each confirmed position on an
-- ordinary connection (the replication connection cannot run SQL). Read by the slot check
-- (seconds since the last confirm while there is lag) and by pruning, which deletes an outbox
-- row only once its transaction committed no later than `last_commit_time`.
CREATE TABLE IF NOT EXISTS cdc_progress (
    slot              text        PRIMARY KEY,
    confirmed_lsn     pg_lsn      NOT NULL,  -- newest position confirmed to the slot
    last_commit_time  timestamptz,           -- commit time of the newest transaction in ClickHouse
    confirmed_at      timestamptz NOT NULL,  -- when confirmed_lsn last moved
    updated_at        timestamptz NOT NULL   -- last write: the consumer is alive and streaming
);
