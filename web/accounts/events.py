"""Events the accounts domain publishes (their fields are the audit context)."""

from __future__ import annotations

from web.outbox.events import Event


class UserCreated(Event):
    """A user account was created (event_type "user_created", metadata_version 1)."""

    email: str
    first_name: str
    last_name: str
