"""`python manage.py outbox_slot_check`: what the per-minute Beat task runs, by hand."""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from web.outbox.tasks import outbox_slot_check_task


class Command(BaseCommand):
    help = "Check the replication slot and the consumer's progress; exit 1 when critical."

    def handle(self, *args: Any, **options: Any) -> None:
        report = outbox_slot_check_task()
        self.stdout.write(json.dumps(report))
        if report["severity"] == "critical":
            raise CommandError("replication slot critical", returncode=1)
