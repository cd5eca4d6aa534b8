"""Fixtures shared by the web tests (the PostgreSQL server comes from tests.support)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import sentry_sdk
from sentry_sdk.envelope import Envelope
from sentry_sdk.transport import Transport


@pytest.fixture
def committed_outbox(settings, pg_conn):
    """For transactional tests: rows get a unique environment and are deleted afterwards.

    TransactionTestCase flushes only managed tables, so committed outbox rows would otherwise
    outlive the test. Pruning-style DELETEs are not published to the slot.
    """
    settings.ENVIRONMENT = f"web-test-{uuid.uuid4().hex[:12]}"
    yield settings.ENVIRONMENT
    pg_conn.execute("DELETE FROM event_outbox WHERE environment = %s", (settings.ENVIRONMENT,))


@pytest.fixture
def fast_passwords(settings):
    """A cheap hasher: the default PBKDF2 costs about a second per password."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


class CapturingTransport(Transport):
    """Sentry's edge of the process: keeps events and transactions instead of sending them,
    and every envelope (check-ins too) as sent."""

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        super().__init__(options)
        self.events: list[Any] = []
        self.envelopes: list[Envelope] = []

    def capture_envelope(self, envelope: Envelope) -> None:
        self.envelopes.append(envelope)
        event = envelope.get_event() or envelope.get_transaction_event()
        if event is not None:
            self.events.append(event)


@pytest.fixture
def sentry_restored() -> Iterator[None]:
    """Whatever the test initialises Sentry with is closed afterwards, and Sentry is inactive
    again, as without a DSN."""
    try:
        yield
    finally:
        sentry_sdk.get_client().close()
        sentry_sdk.get_global_scope().set_client(None)


@pytest.fixture
def sentry_events(sentry_restored: None) -> list[dict[str, Any]]:
    """Sentry initialised with tracing on and a capturing transport; the events it got."""
    transport = CapturingTransport()
    sentry_sdk.init(
        dsn="https://public@sentry.invalid/1", transport=transport, traces_sample_rate=1.0
    )
    return transport.events
