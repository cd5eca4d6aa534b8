"""`python manage.py event_schemas`: the JSON Schema of every event type and version.

What a reader of `event_log` needs to interpret `event_context`: one JSON document per
`(event_type, metadata_version)`, as the context is stored (pydantic's serialisation schema).
"""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from web.outbox.registry import event_classes


class Command(BaseCommand):
    help = "Print the JSON Schema of each registered event type and metadata_version."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--type", dest="event_type", help="only this event_type")

    def handle(self, *args: Any, event_type: str | None, **options: Any) -> None:
        classes = [c for c in event_classes() if event_type in (None, c.event_type)]
        if not classes:
            raise CommandError(f"no registered event type {event_type!r}")
        schemas = [
            {
                "event_type": cls.event_type,
                "metadata_version": cls.metadata_version,
                "class": f"{cls.__module__}.{cls.__qualname__}",
                "schema": cls.model_json_schema(mode="serialization"),
            }
            for cls in classes
        ]
        self.stdout.write(json.dumps(schemas, indent=2))
