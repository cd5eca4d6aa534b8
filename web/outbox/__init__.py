"""The transactional outbox: `publish.event_publish` writes one `events.Event` per call into
`event_outbox`, in the caller's transaction; the cdc_consumer ships it from the WAL."""
