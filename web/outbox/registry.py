"""Every event class, by `(event_type, metadata_version)`.

Classes register themselves when they are defined (see `Event`), and the outbox app imports
each installed app's `events` module at startup, so the registry is complete once Django is
ready. A reader of `event_log` finds the schema of any row's `(event_type, metadata_version)`
here, e.g. through `manage.py event_schemas`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from web.outbox.events import Event

_classes: dict[tuple[str, int], type[Event]] = {}


def event_class_register(cls: type[Event]) -> None:
    """Claim `(cls.event_type, cls.metadata_version)` for `cls`.

    Raises TypeError when another class already claims it: two schemas for one key would make
    the rows in event_log ambiguous. Redefining the same class (same module and name, as a
    module reload does) replaces the old definition.
    """
    key = (cls.event_type, cls.metadata_version)
    current = _classes.get(key)
    if current is not None and _name(current) != _name(cls):
        raise TypeError(
            f"{_name(cls)} claims event_type {key[0]!r} metadata_version {key[1]}, "
            f"already claimed by {_name(current)}: give one of them another metadata_version"
        )
    _classes[key] = cls


def event_class_get(event_type: str, metadata_version: int) -> type[Event] | None:
    """The class registered for this type and version, or None."""
    return _classes.get((event_type, metadata_version))


def event_classes() -> list[type[Event]]:
    """Every registered class, sorted by type then version."""
    return [_classes[key] for key in sorted(_classes)]


def _name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
