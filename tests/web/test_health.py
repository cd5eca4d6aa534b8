"""web.health and the WSGI entry point."""

from __future__ import annotations


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
