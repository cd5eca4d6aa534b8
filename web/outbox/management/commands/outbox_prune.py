"""`python manage.py outbox_prune`: what the hourly Beat task runs, by hand."""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand

from web.outbox.tasks import outbox_prune_task


class Command(BaseCommand):
    help = "Delete outbox rows past OUTBOX_RETENTION that are already in ClickHouse."

    def handle(self, *args: Any, **options: Any) -> None:
        self.stdout.write(json.dumps(outbox_prune_task()))
