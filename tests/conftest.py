"""Suite-wide fixtures. Plugins in tests/support/ hold the rest; this file exists because a
conftest fixture is the only way to override pytest-django's own `django_db_setup`."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest


@pytest.fixture(scope="session")
def django_db_setup(django_db_blocker: Any, postgres_url: str) -> None:
    """Use the disposable database as is: Django's migrations plus our sql/ runner."""
    from django.core.management import call_command

    from cdc_consumer import migrations

    with django_db_blocker.unblock():
        call_command("migrate", verbosity=0)
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        migrations.migrate_postgres(conn, migrations.SQL_ROOT / "postgres")
