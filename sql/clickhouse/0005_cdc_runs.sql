-- One row per run of a source that took its slot: the epoch it claimed (one more than the
-- newest before it; only the slot's owner writes, so claims never race). Every insert of a run
-- carries a guard that the source's newest epoch is still its own, so a run frozen past
-- wal_sender_timeout that wakes cannot write after its successor read what is stored.
CREATE TABLE IF NOT EXISTS cdc_runs
(
    source      String,
    epoch       UInt64,
    run         String,                              -- the run's query id prefix
    claimed_at  DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = MergeTree
ORDER BY (source, epoch);
