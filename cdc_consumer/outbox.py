"""The outbox's contract, shared by the web app that writes it and the consumer that reads it.

The web app's publish, the pipeline's relation match, the encoder and the backfill all read
these names from here, so a column cannot be added in one place and missed in another.
"""

from __future__ import annotations

OUTBOX_SCHEMA = "public"
OUTBOX_TABLE = "event_outbox"
# The outbox columns event_log is built from, in the order the encoder reads them (the backfill
# selects them as text in this order, too).
OUTBOX_COLUMNS = (
    "event_id",
    "event_type",
    "event_date_time",
    "environment",
    "event_context",
    "metadata_version",
    "trace_id",  # NULL when the publisher was not traced: written as ''
)
