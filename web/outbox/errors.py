"""The one exception publishing raises: the event cannot be published as given.

It is raised before any SQL runs, so the caller's transaction is untouched and can go on.
"""

from __future__ import annotations


class EventPublishError(ValueError):
    """An event that cannot be published as given; nothing was written.

    `event_type` is the type the caller tried to publish; `field` the dotted path of the
    offending value inside the context (`address.lines.0`), or None when the event as a whole
    is wrong (an unregistered class, a context over the size limit).
    """

    def __init__(self, reason: str, *, event_type: str, field: str | None = None) -> None:
        where = f" (field {field!r})" if field else ""
        super().__init__(f"cannot publish {event_type!r}{where}: {reason}")
        self.event_type = event_type
        self.field = field


def dotted_path(parts: tuple[str | int, ...] | list[str | int]) -> str | None:
    """`("address", "lines", 0)` -> `"address.lines.0"`: how errors name a field; None if empty."""
    return ".".join(str(part) for part in parts) or None
