"""pytest plugin: one disposable PostgreSQL (wal_level=logical) for the whole test session.

Started before Django reads its settings, so DATABASE_URL points at it; `TEST_DATABASE_URL`
names an external server instead (CI with service containers, a developer's own server).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from demo.postgres import DisposablePostgres

_SERVER: DisposablePostgres | None = None


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config) -> None:
    """Start the server (unless TEST_DATABASE_URL is set) before pytest-django sets up Django."""
    global _SERVER  # noqa: PLW0603  (one server per pytest process, owned by this plugin)
    url = os.environ.get("TEST_DATABASE_URL")
    if not url:
        _SERVER = DisposablePostgres.create(prefix="outbox-test-pg-")
        _SERVER.start()
        url = _SERVER.url
    os.environ["DATABASE_URL"] = url
    os.environ.setdefault("ENVIRONMENT", "test")
    os.environ.setdefault("DJANGO_SECRET_KEY", "test-only-secret-key-not-for-production")
    os.environ.setdefault("LOG_LEVEL", "warning")


def pytest_unconfigure(config: pytest.Config) -> None:
    if _SERVER is not None:
        _SERVER.destroy()


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """URL of the session's PostgreSQL (logical replication on)."""
    return os.environ["DATABASE_URL"]


@pytest.fixture(scope="session")
def postgres_server() -> DisposablePostgres:
    """The disposable server itself, for tests that stop and start it."""
    if _SERVER is None:
        pytest.skip("TEST_DATABASE_URL names an external server this test cannot restart")
    return _SERVER


@pytest.fixture
def pg_conn(postgres_url: str) -> Iterator[psycopg.Connection[Any]]:
    """An autocommit connection for checks outside Django."""
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        yield conn
