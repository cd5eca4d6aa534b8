"""The Celery app (worker and Beat) and, in one place, the Beat schedule.

    celery -A web.celery worker      # runs the tasks
    celery -A web.celery beat        # sends them on the schedule below

The broker is CELERY_BROKER_URL (Redis). Tasks live in `web.outbox.tasks` and are thin: each
calls one plain function that also runs from a management command and from a test.

Logs: django-structlog's worker step binds each task's `task_id` and the context of whoever sent
it (a request's `request_id` and `user_id`, a parent task's id as `parent_task_id`), carried in
the task's headers; `task_name` is bound below. Every line the task writes carries them.
Sentry: the worker and Beat initialise it at start, with every Beat entry a cron monitor.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import structlog
from celery import Celery
from celery.signals import beat_init, worker_init
from django.dispatch import receiver
from django_structlog.celery.signals import bind_extra_task_metadata
from django_structlog.celery.steps import DjangoStructLogInitStep

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "web.settings")

app = Celery("web")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks(["web.outbox"])
app.steps["worker"].add(DjangoStructLogInitStep)


def beat_schedule() -> dict[str, dict[str, Any]]:
    """Every periodic task, with when it runs (intervals from the environment)."""
    from django.conf import settings  # noqa: PLC0415  (Django is set up by the time Beat asks)

    prune_every = timedelta(seconds=settings.OUTBOX_PRUNE_INTERVAL_SECONDS)
    check_every = timedelta(seconds=settings.OUTBOX_SLOT_CHECK_INTERVAL_SECONDS)
    return {
        # Every OUTBOX_PRUNE_INTERVAL_SECONDS (default 3600: hourly): delete outbox rows older
        # than OUTBOX_RETENTION that are already in ClickHouse.
        "outbox-prune": {
            "task": "web.outbox.tasks.outbox_prune_task",
            "schedule": prune_every,
            "options": {"expires": prune_every.total_seconds()},
        },
        # Every OUTBOX_SLOT_CHECK_INTERVAL_SECONDS (default 60: every minute): read the slot and
        # the consumer's progress; log, and alert Sentry on a breach.
        "outbox-slot-check": {
            "task": "web.outbox.tasks.outbox_slot_check_task",
            "schedule": check_every,
            # A check that waited longer than its interval is stale: the next one is due.
            "options": {"expires": check_every.total_seconds()},
        },
    }


@app.on_after_configure.connect
def _install_schedule(sender: Celery, **_kwargs: Any) -> None:
    sender.conf.beat_schedule = beat_schedule()


@receiver(bind_extra_task_metadata)
def _bind_task_name(task: Any, **_kwargs: Any) -> None:
    """Every line of a task carries its name (django-structlog binds only `task_id`)."""
    structlog.contextvars.bind_contextvars(task_name=task.name)


@worker_init.connect
@beat_init.connect
def _init_sentry(**_kwargs: Any) -> None:
    """Sentry in the worker and Beat processes (the web process does it in web.wsgi)."""
    from web.observability import configure_web_sentry  # noqa: PLC0415

    configure_web_sentry()
