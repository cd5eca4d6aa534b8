"""Events the accounts domain publishes (their fields are the audit context)."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

from pydantic import AfterValidator

from web.outbox.events import Event


class UserCreated(Event):
    """A user account was created (event_type "user_created", metadata_version 1)."""

    email: str
    first_name: str
    last_name: str


class LoginFailureReason(StrEnum):
    """Why a login was refused: for the audit log only, never told to the client."""

    UNKNOWN_USER = "unknown_user"
    BAD_PASSWORD = "bad_password"  # noqa: S105 (a reason code, not a password)
    INACTIVE_USER = "inactive_user"


def _clipped(limit: int) -> AfterValidator:
    # These fields come from the client: bound them so the context stays small, and replace
    # NUL, which jsonb refuses (event_publish would raise instead of recording the attempt).
    return AfterValidator(lambda value: value[:limit].replace("\x00", "\ufffd"))


class LoginFailed(Event):
    """A login was refused (event_type "login_failed", metadata_version 1). Never the password.

    `username` is what was typed (clipped to 150, the longest username Django stores),
    `user_agent` is clipped to 512 characters.
    """

    username: Annotated[str, _clipped(150)]
    reason: LoginFailureReason
    remote_addr: Annotated[str, _clipped(64)] | None
    user_agent: Annotated[str, _clipped(512)] | None
