"""Health endpoints.

- `GET /health/`: liveness. The process answers HTTP; it checks no dependency, so a database
  outage does not make an orchestrator restart every web worker.
- `GET /health/outbox`: the slot check as JSON (the same report as `python -m cdc_consumer
  status --json`): 200 when ok or warning, 503 when critical. It holds slot name, positions,
  sizes and times, never a connection string or credential. A database it cannot reach is
  critical too (503).
"""

from __future__ import annotations

import structlog
from django.conf import settings
from django.db import DatabaseError
from django.http import HttpRequest, JsonResponse
from django.views.decorators.http import require_GET

from cdc_consumer.status import Severity
from web.outbox.slot import outbox_slot_report

log = structlog.get_logger(__name__)


@require_GET
def health(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})


@require_GET
def health_outbox(request: HttpRequest) -> JsonResponse:
    try:
        report = outbox_slot_report()
    except DatabaseError as exc:
        # Nothing about the slot is known, which is as bad as a lost one; the error's text may
        # name the host, so only its class goes out.
        log.error("slot check failed", error=str(exc).strip().split("\n")[0])
        unknown = {
            "slot": settings.CDC_SLOT,
            "severity": Severity.CRITICAL.value,
            "problems": [f"database unreachable ({type(exc).__name__})"],
        }
        return JsonResponse(unknown, status=503)
    status = 503 if report.severity is Severity.CRITICAL else 200
    return JsonResponse(report.as_dict(), status=status)
