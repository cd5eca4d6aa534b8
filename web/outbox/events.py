"""The event base: a frozen pydantic model whose fields are the event's context.

    class UserCreated(Event):          # event_type "user_created", metadata_version 1
        email: str

    class UserCreatedV2(Event):
        event_type = "user_created"     # explicit type, e.g. for a new schema version
        metadata_version = 2
        email: str
        display_name: str

The type and version are class attributes, checked when the class is defined, and the class
is registered under them (see `registry`), so a malformed or doubly claimed type fails at
import time rather than at the first publish. Constructing an event validates the context
against the fields; a value that does not fit raises EventPublishError naming the field.
"""

from __future__ import annotations

import re
import types
import typing
from typing import Any, ClassVar

import pydantic
from pydantic import BaseModel, ConfigDict

from web.outbox.errors import EventPublishError, dotted_path
from web.outbox.registry import event_class_register

_EVENT_TYPE = re.compile(r"^[a-z][a-z0-9_]{0,127}$")
# A boundary before an upper-case letter that follows a lower-case letter or digit
# ("userCreated"), or that starts a word after an acronym ("HTTPRequest" -> "HTTP_Request").
_WORD_BOUNDARY = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")
# Containers whose bare annotation says nothing about what they hold.
_BARE_CONTAINERS = (dict, list, tuple, set, frozenset)


def snake_case(name: str) -> str:
    """`UserCreated` -> `user_created`, `HTTPRequestFailed` -> `http_request_failed`."""
    return _WORD_BOUNDARY.sub("_", name).lower()


class Event(BaseModel):
    """Base of every published event; subclass it and declare the context as fields."""

    # frozen: an event is a fact; extra="forbid": a misspelt field is an error, not lost data;
    # ser_json_inf_nan="constants": JSON mode keeps NaN/Infinity as floats (pydantic's default
    # turns them into null, silently), so publishing can see and reject them.
    model_config = ConfigDict(frozen=True, extra="forbid", ser_json_inf_nan="constants")

    event_type: ClassVar[str]
    metadata_version: ClassVar[int] = 1
    # Fields annotated Any, object or a bare container: their values get no conversion from a
    # schema, so publishing accepts only what JSON itself can carry there.
    untyped_fields: ClassVar[tuple[str, ...]] = ()

    def __init__(self, /, **context: Any) -> None:
        try:
            super().__init__(**context)
        except pydantic.ValidationError as exc:
            raise _context_error(type(self), exc) from exc

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        # pydantic's counterpart of __init_subclass__, called once the model class is complete.
        super().__pydantic_init_subclass__(**kwargs)
        if "event_type" not in cls.__dict__:
            cls.event_type = snake_case(cls.__name__)
        if not _EVENT_TYPE.match(cls.event_type):
            raise TypeError(
                f"{cls.__qualname__}.event_type {cls.event_type!r} must be snake_case: "
                "a lower-case letter, then letters, digits or underscores (at most 128)"
            )
        version = cls.metadata_version
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise TypeError(
                f"{cls.__qualname__}.metadata_version must be a non-negative int, not {version!r}"
            )
        cls.untyped_fields = tuple(
            name for name, info in cls.model_fields.items() if _is_untyped(info.annotation)
        )
        event_class_register(cls)


def _context_error(cls: type[Event], exc: pydantic.ValidationError) -> EventPublishError:
    """EventPublishError for the first problem pydantic found, mentioning how many more."""
    errors = exc.errors(include_url=False, include_input=False)
    first = errors[0]
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return EventPublishError(
        f"context does not fit the schema: {first['msg']}{more}",
        event_type=cls.event_type,
        field=dotted_path(first["loc"]),
    )


def _is_untyped(annotation: Any) -> bool:
    if annotation is Any or annotation is object or annotation in _BARE_CONTAINERS:
        return True
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is not None:
        return any(_is_untyped(arg) for arg in typing.get_args(annotation))
    return False
