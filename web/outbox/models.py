"""The ORM's view of `event_outbox` and `cdc_progress`.

The tables belong to the numbered files in `sql/postgres/` (applied by the sql/ runner, because
the consumer depends on them and must not need Django), hence `managed = False`: Django never
creates, alters or drops them. Keep the fields in step with those files.
"""

from __future__ import annotations

import json
from typing import Any

import orjson
from django.db import models
from django.db.models.functions import Now

from cdc_consumer.outbox import OUTBOX_TABLE


class OrjsonEncoder(json.JSONEncoder):
    """Encodes jsonb values the ORM writes or looks up with orjson, not the json module.

    The json module writes NaN as a bare `NaN` token, which PostgreSQL rejects; orjson writes
    null instead (publishing, which writes the rows, refuses NaN before it gets here).
    """

    def encode(self, o: Any) -> str:
        return orjson.dumps(o).decode()


class EventOutbox(models.Model):
    """One published event, waiting for the consumer to read it from the WAL (insert-only)."""

    event_id = models.UUIDField(primary_key=True)  # UUIDv7, time-ordered
    event_type = models.TextField()
    event_date_time = models.DateTimeField()  # the moment of publishing, UTC
    environment = models.TextField()
    event_context = models.JSONField(encoder=OrjsonEncoder)
    metadata_version = models.BigIntegerField()
    trace_id = models.TextField(null=True)  # the publishing request's Sentry trace, if traced
    created_at = models.DateTimeField(db_default=Now())  # set by PostgreSQL, read by pruning

    class Meta:
        managed = False
        db_table = OUTBOX_TABLE  # the contract the consumer reads too (cdc_consumer.outbox)

    def __str__(self) -> str:
        return f"{self.event_type} {self.event_id}"


class CdcProgress(models.Model):
    """What the consumer has shipped to ClickHouse, per slot (written only by cdc_consumer).

    Owned by `sql/postgres/0002_cdc_progress.sql`; pruning reads `last_commit_time`.
    """

    slot = models.TextField(primary_key=True)
    confirmed_lsn = models.TextField()  # pg_lsn; read as text, never written from here
    last_commit_time = models.DateTimeField(null=True)
    confirmed_at = models.DateTimeField()
    updated_at = models.DateTimeField()

    class Meta:
        managed = False
        db_table = "cdc_progress"

    def __str__(self) -> str:
        return f"{self.slot} at {self.confirmed_lsn}"
