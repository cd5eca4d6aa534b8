"""web.accounts.services: user_create commits the user with `user_created`; user_login audits
every refusal as `login_failed`."""

from __future__ import annotations

import logging

import pytest
from django.contrib.auth.models import User
from django.core.exceptions import ValidationError
from django.db import transaction

from web.accounts.services import (
    InvalidCredentialsError,
    UserEmailTakenError,
    user_create,
    user_login,
)
from web.outbox.models import EventOutbox

pytestmark = pytest.mark.django_db


def _user_created_contexts() -> list[dict[str, str]]:
    return list(
        EventOutbox.objects.filter(event_type="user_created").values_list(
            "event_context", flat=True
        )
    )


def test_user_create_publishes_user_created():
    """A new user (username = email) comes with one user_created event holding email and names."""
    user = user_create(email="ada@example.com", first_name="Ada", last_name="Lovelace")
    assert (user.username, user.email) == ("ada@example.com", "ada@example.com")
    assert not user.has_usable_password()
    assert _user_created_contexts() == [
        {"email": "ada@example.com", "first_name": "Ada", "last_name": "Lovelace"}
    ]
    row = EventOutbox.objects.get(event_type="user_created")
    assert row.metadata_version == 1


def test_user_create_sets_password(fast_passwords):
    """A given password is stored hashed and checks."""
    user = user_create(email="grace@example.com", first_name="G", last_name="H", password="pw-1")
    user.refresh_from_db()
    assert user.check_password("pw-1")
    assert "pw-1" not in user.password


def test_email_domain_is_normalised():
    """The domain part of the email is lower-cased (Django's normalize_email)."""
    user = user_create(email="Alan@Example.COM", first_name="Alan", last_name="Turing")
    assert user.email == "Alan@example.com"
    assert _user_created_contexts()[0]["email"] == "Alan@example.com"


def test_duplicate_email_is_refused_without_event():
    """A second user with the same email raises UserEmailTakenError and publishes nothing."""
    user_create(email="dup@example.com", first_name="A", last_name="B")
    with pytest.raises(UserEmailTakenError):
        user_create(email="dup@example.com", first_name="C", last_name="D")
    assert User.objects.count() == 1
    assert len(_user_created_contexts()) == 1


def test_invalid_email_is_refused_before_sql(django_assert_num_queries):
    """Django's User validators reject a malformed email before anything is written."""
    with django_assert_num_queries(0), pytest.raises(ValidationError) as caught:
        user_create(email="not an email", first_name="A", last_name="B")
    assert "email" in caught.value.message_dict


def test_caller_rollback_removes_user_and_event():
    """Inside a caller's transaction that rolls back, neither the user nor its event remain."""

    def caller_that_fails_later() -> None:
        with transaction.atomic():
            user_create(email="gone@example.com", first_name="A", last_name="B")
            raise RuntimeError("caller failed later")

    with pytest.raises(RuntimeError, match="caller failed later"):
        caller_that_fails_later()
    assert not User.objects.filter(username="gone@example.com").exists()
    assert _user_created_contexts() == []


def test_duplicate_inside_caller_transaction_leaves_it_usable():
    """A duplicate rolls back only its own savepoint; the caller's transaction carries on."""
    user_create(email="first@example.com", first_name="A", last_name="B")
    with transaction.atomic():
        with pytest.raises(UserEmailTakenError):
            user_create(email="first@example.com", first_name="A", last_name="B")
        user_create(email="second@example.com", first_name="C", last_name="D")
    assert User.objects.count() == 2


def test_user_creation_is_logged_without_email(caplog):
    """The service logs 'user created' with the user id and never the email (no payloads)."""
    caplog.set_level(logging.INFO, logger="web.accounts.services")
    user = user_create(email="quiet@example.com", first_name="Q", last_name="R")
    entries = [record.msg for record in caplog.records if record.name == "web.accounts.services"]
    assert len(entries) == 1
    assert isinstance(entries[0], dict)
    assert entries[0]["event"] == "user created"
    assert entries[0]["user_id"] == user.pk
    assert "quiet@example.com" not in repr(entries[0])


_ADDR = "203.0.113.7"
_AGENT = "Mozilla/5.0 (audit test)"


def _login_failed_contexts() -> list[dict[str, str | None]]:
    return list(
        EventOutbox.objects.filter(event_type="login_failed").values_list(
            "event_context", flat=True
        )
    )


def _login(username: str, password: str, user_agent: str | None = _AGENT) -> User:
    return user_login(
        username=username, password=password, remote_addr=_ADDR, user_agent=user_agent
    )


@pytest.fixture
def ada(fast_passwords) -> User:
    """An active user with a password, whose user_created event is already in the outbox."""
    return user_create(
        email="ada@example.com", first_name="Ada", last_name="L", password="right-pass"
    )


def test_user_login_returns_the_user_and_publishes_nothing(ada):
    """The right credentials return the user and publish no login event."""
    assert _login("ada@example.com", "right-pass") == ada
    assert _login_failed_contexts() == []


@pytest.mark.parametrize(
    ("username", "password", "active", "reason"),
    [
        ("nobody@example.com", "right-pass", True, "unknown_user"),
        ("ada@example.com", "wrong-pass", True, "bad_password"),
        ("ada@example.com", "right-pass", False, "inactive_user"),
        ("ada@example.com", "wrong-pass", False, "inactive_user"),
    ],
    ids=["unknown-user", "bad-password", "inactive-right-password", "inactive-wrong-password"],
)
def test_refusal_publishes_one_login_failed(ada, username, password, active, reason):
    """Each refusal raises the same error and publishes one login_failed with its reason."""
    User.objects.filter(pk=ada.pk).update(is_active=active)
    with pytest.raises(InvalidCredentialsError):
        _login(username, password)
    contexts = _login_failed_contexts()
    assert contexts == [
        {"username": username, "reason": reason, "remote_addr": _ADDR, "user_agent": _AGENT}
    ]
    assert password not in repr(contexts)


def test_audit_fields_are_clipped_and_nul_free(ada):
    """A long username or user agent is clipped, and NUL replaced, so the event still publishes."""
    with pytest.raises(InvalidCredentialsError):
        _login("u" * 1000, "wrong-pass", user_agent="agent\x00" + "a" * 1000)
    [context] = _login_failed_contexts()
    assert context["username"] == "u" * 150
    assert context["user_agent"] == "agent\ufffd" + "a" * 506


def test_refusal_without_client_details_records_nulls(ada):
    """Without a remote address or user agent, the event records null for both."""
    with pytest.raises(InvalidCredentialsError):
        user_login(username="x", password="y", remote_addr=None, user_agent=None)
    [context] = _login_failed_contexts()
    assert (context["remote_addr"], context["user_agent"]) == (None, None)


def test_caller_rollback_removes_login_failed():
    """Inside a caller's transaction that rolls back, the refusal leaves no event."""

    def caller_that_fails_later() -> None:
        with transaction.atomic():
            with pytest.raises(InvalidCredentialsError):
                _login("nobody@example.com", "pw")
            raise RuntimeError("caller failed later")

    with pytest.raises(RuntimeError, match="caller failed later"):
        caller_that_fails_later()
    assert _login_failed_contexts() == []


def test_login_failure_is_logged_without_username(ada, caplog):
    """The service logs 'login failed' with reason and user id, never the username or password."""
    caplog.set_level(logging.INFO, logger="web.accounts.services")
    with pytest.raises(InvalidCredentialsError):
        _login("ada@example.com", "wrong-pass")
    [entry] = [record.msg for record in caplog.records if record.name == "web.accounts.services"]
    assert isinstance(entry, dict)
    assert (entry["event"], entry["reason"], entry["user_id"]) == (
        "login failed",
        "bad_password",
        ada.pk,
    )
    assert "ada@example.com" not in repr(entry)
    assert "wrong-pass" not in repr(entry)
