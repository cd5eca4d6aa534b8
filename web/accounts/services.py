"""Writes for the accounts domain. Each service owns its transaction."""

from __future__ import annotations

import structlog
from django.contrib.auth.models import User
from django.db import IntegrityError, transaction

from web.accounts.events import UserCreated
from web.outbox.publish import event_publish

log = structlog.get_logger(__name__)


class UserEmailTakenError(Exception):
    """Another user already has this email (which is also the username)."""


def user_create(
    *, email: str, first_name: str, last_name: str, password: str | None = None
) -> User:
    """Create a user (username = email) and publish `user_created`, committed together.

    Raises django.core.exceptions.ValidationError for invalid fields (Django's own User
    validators) and UserEmailTakenError for a duplicate. Without a password the account gets an
    unusable one. Called inside a caller's atomic block, this is a savepoint within it.
    """
    email = User.objects.normalize_email(email)
    user = User(username=email, email=email, first_name=first_name, last_name=last_name)
    if password is None:
        user.set_unusable_password()
    else:
        user.set_password(password)
    # Uniqueness is left to the database constraint below, which is also race-free.
    user.full_clean(validate_unique=False)
    try:
        with transaction.atomic():
            user.save()
            event_publish(
                event=UserCreated(email=email, first_name=first_name, last_name=last_name)
            )
    except IntegrityError as exc:
        # The block was rolled back; tell a duplicate apart from any other constraint.
        if User.objects.filter(username=email).exists():
            raise UserEmailTakenError(email) from exc
        raise
    log.info("user created", user_id=user.pk)
    return user
