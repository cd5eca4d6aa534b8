"""POST /api/users/ and POST /api/login/: thin JSON views over user_create and user_login."""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib.auth.models import User
from django.core.handlers.wsgi import WSGIHandler
from django.core.signals import request_finished, request_started
from django.db import close_old_connections
from django.test import Client

from web.accounts.services import user_create
from web.outbox.models import EventOutbox

pytestmark = pytest.mark.django_db

_URL = "/api/users/"
_BODY = {"email": "ada@example.com", "first_name": "Ada", "last_name": "Lovelace"}


def _post(
    client: Client,
    body: dict[str, Any] | str,
    url: str = _URL,
    headers: dict[str, str] | None = None,
) -> Any:
    # The test client JSON-encodes a dict; a string is sent as is (for malformed bodies).
    return client.post(url, data=body, content_type="application/json", headers=headers)


def test_created(client):
    """A valid body gives 201 with the new user's id and email, and a user_created event."""
    response = _post(client, _BODY)
    assert response.status_code == 201
    user = User.objects.get()
    assert response.json() == {"id": user.pk, "email": "ada@example.com"}
    assert EventOutbox.objects.filter(event_type="user_created").count() == 1


def test_created_with_password(client, fast_passwords):
    """An optional password is accepted and never echoed back."""
    response = _post(client, {**_BODY, "password": "s3cret-pass"})
    assert response.status_code == 201
    assert "s3cret-pass" not in response.content.decode()
    assert User.objects.get().check_password("s3cret-pass")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"email": "ada@example.com", "first_name": "Ada"}, "last_name"),
        ({**_BODY, "is_superuser": True}, "is_superuser"),
        ({**_BODY, "first_name": 7}, "first_name"),
        ("{not json", "body"),
        ("[]", "body"),
    ],
    ids=["missing-field", "unknown-field", "wrong-type", "not-json", "not-an-object"],
)
def test_malformed_body_is_400(client, body, field):
    """A body of the wrong shape gives 400 naming the field, and writes nothing."""
    response = _post(client, body)
    assert response.status_code == 400
    payload = response.json()
    assert payload["error"] == "invalid request"
    assert field in payload["fields"]
    assert not User.objects.exists()
    assert not EventOutbox.objects.exists()


def test_invalid_email_is_400(client):
    """A malformed email gives 400 under the `email` field."""
    response = _post(client, {**_BODY, "email": "not an email"})
    assert response.status_code == 400
    assert list(response.json()["fields"]) == ["email"]


def test_password_is_not_echoed_in_errors(client):
    """Validation errors never repeat the submitted values (the password included)."""
    response = _post(client, {"email": "x@example.com", "password": "hunter2-secret"})
    assert response.status_code == 400
    assert "hunter2-secret" not in response.content.decode()


def test_duplicate_email_is_409(client):
    """A second user with the same email gives 409 and no second event."""
    assert _post(client, _BODY).status_code == 201
    response = _post(client, {**_BODY, "first_name": "Other"})
    assert response.status_code == 409
    assert response.json() == {"error": "a user with this email already exists"}
    assert EventOutbox.objects.filter(event_type="user_created").count() == 1


def test_only_post_is_allowed(client):
    """GET on the collection is 405 (there is no listing)."""
    assert client.get(_URL).status_code == 405


_LOGIN_URL = "/api/login/"


@pytest.fixture
def ada(fast_passwords) -> User:
    """An active user who can log in with `right-pass`."""
    return user_create(
        email="ada@example.com", first_name="A", last_name="L", password="right-pass"
    )


def _login(client: Client, body: dict[str, Any] | str) -> Any:
    return _post(client, body, _LOGIN_URL, headers={"User-Agent": "test-agent/1.0"})


def test_login_ok(client, ada):
    """The right credentials give 200 with the user's id and no login event."""
    response = _login(client, {"username": "ada@example.com", "password": "right-pass"})
    assert response.status_code == 200
    assert response.json() == {"id": ada.pk}
    assert not EventOutbox.objects.filter(event_type="login_failed").exists()


def test_login_refusals_look_the_same(client, ada):
    """Unknown user and bad password give the same 401 body; the audit tells them apart."""
    unknown = _login(client, {"username": "nobody@example.com", "password": "right-pass"})
    bad = _login(client, {"username": "ada@example.com", "password": "wrong-pass"})
    assert (unknown.status_code, bad.status_code) == (401, 401)
    assert unknown.content == bad.content == b'{"error": "invalid credentials"}'
    contexts = EventOutbox.objects.filter(event_type="login_failed").order_by("event_id")
    assert [row.event_context for row in contexts] == [
        {
            "username": username,
            "reason": reason,
            "remote_addr": "127.0.0.1",
            "user_agent": "test-agent/1.0",
        }
        for username, reason in [
            ("nobody@example.com", "unknown_user"),
            ("ada@example.com", "bad_password"),
        ]
    ]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"username": "ada@example.com"}, "password"),
        ({"username": "ada@example.com", "password": "pw", "remember": True}, "remember"),
        ({"username": 7, "password": "pw"}, "username"),
        ({"username": "ada\x00", "password": "pw"}, "username"),
        ("{not json", "body"),
    ],
    ids=["missing-field", "unknown-field", "wrong-type", "nul-in-username", "not-json"],
)
def test_login_malformed_body_is_400(client, body, field):
    """A body of the wrong shape gives 400 naming the field, and publishes nothing."""
    response = _login(client, body)
    assert response.status_code == 400
    assert field in response.json()["fields"]
    assert not EventOutbox.objects.exists()


def test_login_password_is_not_echoed_in_errors(client):
    """A 400 never repeats the submitted password."""
    response = _login(client, {"username": ["x"], "password": "hunter2-secret"})
    assert response.status_code == 400
    assert "hunter2-secret" not in response.content.decode()


def test_login_only_post_is_allowed(client):
    """GET on the login endpoint is 405."""
    assert client.get(_LOGIN_URL).status_code == 405


def test_event_row_leads_back_to_the_request_trace(rf, sentry_events):
    """With tracing on, the outbox row carries the trace id of the request that published it."""
    # Through the WSGI application, as a server calls it: that is where Sentry's Django
    # integration opens the request's transaction (the test client bypasses it).
    environ = rf.post(
        _URL, data={**_BODY, "email": "traced@example.com"}, content_type="application/json"
    ).environ
    statuses: list[str] = []

    def start_response(status: str, headers: list[tuple[str, str]], *exc: Any) -> Any:
        statuses.append(status)
        return lambda data: None

    # As Django's test client does: the test's connection (and its transaction) must survive
    # the request's start and end signals.
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    try:
        body = WSGIHandler()(environ, start_response)
    finally:
        request_started.connect(close_old_connections)
        request_finished.connect(close_old_connections)
    assert statuses == ["201 Created"], b"".join(body)
    [request_trace] = [e for e in sentry_events if e.get("type") == "transaction"]
    assert request_trace["transaction"] == "/api/users/"
    row = EventOutbox.objects.get(event_type="user_created")
    assert row.trace_id == request_trace["contexts"]["trace"]["trace_id"]
