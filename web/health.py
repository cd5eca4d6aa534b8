"""Health endpoints.

- `GET /health/`: liveness. The process answers HTTP; it checks no dependency, so a database
  outage does not make an orchestrator restart every web worker.
- `GET /health/outbox`: the slot check as JSON (the same report as `python -m cdc_consumer
  status --json`): 200 when ok or warning, 503 when critical. It holds slot name, positions,
  sizes and times, never a connection string or credential.
"""

from __future__ import annotations

from django.http import HttpRequest, JsonResponse
from django.views.decorators.http import require_GET

from cdc_consumer.status import Severity
from web.outbox.slot import outbox_slot_report


@require_GET
def health(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})


@require_GET
def health_outbox(request: HttpRequest) -> JsonResponse:
    report = outbox_slot_report()
    status = 503 if report.severity is Severity.CRITICAL else 200
    return JsonResponse(report.as_dict(), status=status)
