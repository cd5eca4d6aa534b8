"""web.health (liveness and the outbox slot check) and the WSGI entry point."""

from __future__ import annotations

import dataclasses
import socket

import psycopg
import pytest


def test_health_answers_ok(client):
    """GET /health/ is 200 {"status": "ok"} and touches no database."""
    response = client.get("/health/")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_health_only_answers_get(client):
    """Other methods get 405."""
    assert client.post("/health/").status_code == 405


def test_wsgi_application_loads():
    """web.wsgi builds the WSGI application (and skips Sentry when no DSN is set)."""
    from django.core.handlers.wsgi import WSGIHandler

    from web.wsgi import application

    assert isinstance(application, WSGIHandler)


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_health_outbox_codes_follow_the_slot_check(
    client, settings, make_consumer, clickhouse_server, postgres_url
):
    """GET /health/outbox: 503 for a missing slot, 200 for a warning (no consumer), 503 past a
    critical threshold; the JSON names no connection string or credential."""
    consumer = make_consumer(clickhouse_server.url)
    settings.CDC_SLOT = consumer.slot
    missing = client.get("/health/outbox")
    assert missing.status_code == 503
    assert missing.json()["severity"] == "critical"
    consumer.migrate()
    warning = client.get("/health/outbox")
    assert warning.status_code == 200
    assert warning.json()["severity"] == "warning"
    settings.SLOT_THRESHOLDS = dataclasses.replace(
        settings.SLOT_THRESHOLDS, stall_critical_seconds=0.001, lag_critical_bytes=1
    )
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("SELECT pg_logical_emit_message(true, 'health-test', 'lag')")
    critical = client.get("/health/outbox")
    assert critical.status_code == 503
    body = critical.content.decode()
    assert [slot["lag_bytes"] > 0 for slot in critical.json()["slots"]] == [True]
    assert postgres_url not in body
    assert "postgresql://" not in body
    assert "secret" not in body.lower()
    assert client.post("/health/outbox").status_code == 405


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_health_outbox_reports_every_slot_and_the_worst(
    client, settings, make_consumer, clickhouse_server
):
    """With two slots in OUTBOX_SLOTS, GET /health/outbox reports each, and one missing makes
    the whole critical (a 503), however healthy the other."""
    present = make_consumer(clickhouse_server.url)
    present.migrate()
    settings.OUTBOX_SLOTS = [present.slot, "never_made_slot"]
    response = client.get("/health/outbox")
    assert response.status_code == 503
    body = response.json()
    assert body["severity"] == "critical"
    assert [(s["slot"], s["severity"]) for s in body["slots"]] == [
        (present.slot, "warning"),
        ("never_made_slot", "critical"),
    ]


@pytest.mark.django_db(transaction=True)
def test_health_outbox_is_503_when_the_database_is_unreachable(client, settings):
    """With PostgreSQL unreachable, GET /health/outbox is a critical 503 naming no host."""
    from django.db import connection

    with socket.socket() as probe:  # a port nobody listens on once the probe is closed
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    real_port = connection.settings_dict["PORT"]
    connection.close()
    connection.settings_dict["PORT"] = dead_port
    try:
        response = client.get("/health/outbox")
    finally:
        connection.close()
        connection.settings_dict["PORT"] = real_port
    assert response.status_code == 503
    assert response.json()["severity"] == "critical"
    assert "unreachable" in response.json()["problems"][0]
    assert str(dead_port) not in response.content.decode()
    assert "127.0.0.1" not in response.content.decode()
