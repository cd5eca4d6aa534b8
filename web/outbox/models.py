"""The ORM's view of `event_outbox`.

The table belongs to `sql/postgres/0001_event_outbox.sql` (applied by the sql/ runner, because
the consumer depends on it and must not need Django), hence `managed = False`: Django never
creates, alters or drops it. Keep the fields in step with that file.
"""

from __future__ import annotations

import json
from typing import Any

import orjson
from django.db import models
from django.db.models.functions import Now


class OrjsonEncoder(json.JSONEncoder):
    """Encodes jsonb parameters with orjson, which passes `orjson.Fragment` through verbatim.

    `event_publish` has already serialised and checked the context; handing the field a
    Fragment of that text means the INSERT carries exactly those bytes, encoded once. Any other
    value (e.g. in a lookup) is encoded by orjson too, so NaN never becomes a bare `NaN` token,
    which PostgreSQL would reject.
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
    created_at = models.DateTimeField(db_default=Now())  # set by PostgreSQL, read by pruning

    class Meta:
        managed = False
        db_table = "event_outbox"

    def __str__(self) -> str:
        return f"{self.event_type} {self.event_id}"
