"""Celery tasks: thin interfaces over plain functions (schedule: web/celery.py).

Each loads its arguments from settings and calls one function; the same functions run from
`manage.py outbox_prune` / `manage.py outbox_slot_check` and from tests. No retries: both run
again on the next Beat tick, and both are safe to repeat.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings

from web.celery import app
from web.outbox.prune import outbox_prune
from web.outbox.slot import (
    outbox_slot_check,
    outbox_slots,
    outbox_slots_report,
    outbox_unlisted_check,
)


@app.task
def outbox_prune_task() -> dict[str, Any]:
    result = outbox_prune(
        slots=outbox_slots(),
        retention=settings.OUTBOX_RETENTION,
        commit_margin=settings.OUTBOX_PRUNE_COMMIT_MARGIN,
        chunk_rows=settings.OUTBOX_PRUNE_CHUNK_ROWS,
    )
    return {"deleted": result.deleted, "chunks": result.chunks, "skipped": result.skipped_reason}


@app.task
def outbox_slot_check_task() -> dict[str, Any]:
    slots = outbox_slots()
    reports = [outbox_slot_check(slot=slot) for slot in slots]
    return outbox_slots_report(reports, outbox_unlisted_check(slots))
