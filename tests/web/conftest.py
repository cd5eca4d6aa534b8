"""Fixtures shared by the web tests (the PostgreSQL server comes from tests.support)."""

from __future__ import annotations

import uuid

import pytest


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
