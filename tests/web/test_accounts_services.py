"""web.accounts.services.user_create: the user and its `user_created` event, committed together."""

from __future__ import annotations

import logging

import pytest
from django.contrib.auth.models import User
from django.core.exceptions import ValidationError
from django.db import transaction

from web.accounts.services import UserEmailTakenError, user_create
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
