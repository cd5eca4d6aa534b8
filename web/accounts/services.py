"""Writes for the accounts domain. Each service owns its transaction."""

from __future__ import annotations

import structlog
from django.contrib.auth import authenticate
from django.contrib.auth.models import User
from django.db import IntegrityError, transaction

from web.accounts.events import LoginFailed, LoginFailureReason, UserCreated
from web.outbox.publish import event_publish

log = structlog.get_logger(__name__)


class UserEmailTakenError(Exception):
    """Another user already has this email (which is also the username)."""


class InvalidCredentialsError(Exception):
    """The login was refused. The same error whatever the reason, which only the audit keeps."""


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


def user_login(
    *, username: str, password: str, remote_addr: str | None, user_agent: str | None
) -> User:
    """The user these credentials belong to; otherwise publish `login_failed` and refuse.

    Django's authenticate() does the checking, and for an unknown username it still runs the
    password hasher once, so a refusal takes as long whether or not the user exists. Its None
    says nothing about why; the reason for the audit comes from one lookup afterwards:
    unknown_user if no user has this username, inactive_user if the account is deactivated
    (whatever the password: checking it again would cost a second hash for inactive accounts
    only, which a client could time), else bad_password. Raises InvalidCredentialsError for
    every reason. Called inside a caller's atomic block, the event is a savepoint within it
    and is lost if the caller rolls back. The username must not contain NUL, which PostgreSQL
    text cannot hold (the view refuses it).
    """
    user = authenticate(username=username, password=password)
    if isinstance(user, User):
        log.info("user logged in", user_id=user.pk)
        return user
    known = User.objects.filter(username=username).first()
    if known is None:
        reason = LoginFailureReason.UNKNOWN_USER
    elif not known.is_active:
        reason = LoginFailureReason.INACTIVE_USER
    else:
        reason = LoginFailureReason.BAD_PASSWORD
    with transaction.atomic():
        event_publish(
            event=LoginFailed(
                username=username, reason=reason, remote_addr=remote_addr, user_agent=user_agent
            )
        )
    log.info("login failed", reason=reason.value, user_id=known.pk if known else None)
    raise InvalidCredentialsError
