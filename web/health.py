"""Health endpoints.

- `GET /health/`: liveness. The process answers HTTP; it checks no dependency, so a database
  outage does not make an orchestrator restart every web worker.
- `GET /health/outbox`: the slot check of every slot (OUTBOX_SLOTS, or CDC_SLOT alone) as
  JSON: the worst severity, each slot's report (as `python -m cdc_consumer status --json`
  gives it) and the streaming slots OUTBOX_SLOTS leaves out; 200 when the worst is ok or
  warning, 503 when critical. It holds slot names, positions, sizes and times, never a
  connection string or credential. A database it cannot reach is critical too (503).
"""

from __future__ import annotations

import structlog
from django.db import DatabaseError
from django.http import HttpRequest, JsonResponse
from django.views.decorators.http import require_GET

from cdc_consumer.postgres import first_line
from cdc_consumer.status import Severity
from web.outbox.slot import (
    outbox_slot_report,
    outbox_slots,
    outbox_slots_report,
    outbox_unlisted_slots,
)

log = structlog.get_logger(__name__)


@require_GET
def health(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})


@require_GET
def health_outbox(request: HttpRequest) -> JsonResponse:
    """Every slot's report (OUTBOX_SLOTS) and the worst severity: 503 when that is critical."""
    slots = outbox_slots()
    try:
        reports = [outbox_slot_report(slot=slot) for slot in slots]
        unlisted = outbox_unlisted_slots(slots)
    except DatabaseError as exc:
        # Nothing about the slots is known, which is as bad as a lost one; the error's text may
        # name the host, so only its class goes out.
        log.error("slot check failed", error=first_line(exc))
        unknown = {
            "severity": Severity.CRITICAL.value,
            "slots": [{"slot": slot, "severity": Severity.CRITICAL.value} for slot in slots],
            "problems": [f"database unreachable ({type(exc).__name__})"],
        }
        return JsonResponse(unknown, status=503)
    body = outbox_slots_report(reports, unlisted)
    status = 503 if body["severity"] == Severity.CRITICAL.value else 200
    return JsonResponse(body, status=status)
