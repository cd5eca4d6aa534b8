"""pytest plugin: a real Celery worker (celery's testing worker, in a thread of this process)
on the Redis broker, so tasks run exactly as Beat would send them.

The broker is CELERY_BROKER_URL, defaulting here (tests only) to Redis database 15 on
127.0.0.1:6379. Each session uses its own queue, so concurrent runs sharing the Redis never
take each other's tasks. The worker shares this process's Django settings, hence its test
database.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

TEST_BROKER_URL = "redis://127.0.0.1:6379/15"


@pytest.fixture(scope="session")
def celery_app() -> Any:
    """The project's Celery app, pointed at the test broker and a queue of this session."""
    from web.celery import app

    broker = os.environ.get("CELERY_BROKER_URL", TEST_BROKER_URL)
    app.conf.update(
        broker_url=broker,
        result_backend=broker,
        task_default_queue=f"test-{uuid.uuid4().hex[:12]}",
        broker_connection_retry_on_startup=True,
        result_expires=300,
    )
    return app


@pytest.fixture
def celery_worker(celery_app: Any) -> Iterator[Any]:
    """A running worker (solo pool) for the test; stopped afterwards."""
    from celery.contrib.testing.worker import start_worker

    with start_worker(
        celery_app, pool="solo", perform_ping_check=False, loglevel="WARNING", shutdown_timeout=30
    ) as worker:
        yield worker
