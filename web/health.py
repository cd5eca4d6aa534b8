"""Liveness: the process answers HTTP. It checks no dependency, so a database outage does not
make an orchestrator restart every web worker; readiness checks belong elsewhere."""

from __future__ import annotations

from django.http import HttpRequest, JsonResponse
from django.views.decorators.http import require_GET


@require_GET
def health(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})
