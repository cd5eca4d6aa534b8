"""HTTP interface for accounts: parse and validate the request, call one service, map errors.

A JSON API authenticated by other means than cookies, hence csrf_exempt. The request body is
checked for shape by pydantic; the service checks the values (Django's User validators).
"""

from __future__ import annotations

from typing import Annotated

import pydantic
import structlog
from django.core.exceptions import ValidationError
from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from web.accounts.services import (
    InvalidCredentialsError,
    UserEmailTakenError,
    user_create,
    user_login,
)


class UserCreateBody(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    email: str
    first_name: str
    last_name: str
    password: str | None = None


@csrf_exempt
@require_POST
def user_create_api(request: HttpRequest) -> JsonResponse:
    """POST /api/users/ -> 201 {id, email}; 400 invalid body or values; 409 duplicate email."""
    try:
        body = UserCreateBody.model_validate_json(request.body)
    except pydantic.ValidationError as exc:
        return _bad_request(_pydantic_problems(exc))
    try:
        user = user_create(
            email=body.email,
            first_name=body.first_name,
            last_name=body.last_name,
            password=body.password,
        )
    except ValidationError as exc:
        return _bad_request(_django_problems(exc))
    except UserEmailTakenError:
        return JsonResponse({"error": "a user with this email already exists"}, status=409)
    return JsonResponse({"id": user.pk, "email": user.email}, status=201)


def _refuse_nul(value: str) -> str:
    # PostgreSQL text cannot hold NUL, so the username lookup would fail with a DataError.
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


class UserLoginBody(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    username: Annotated[str, pydantic.AfterValidator(_refuse_nul)]
    password: str


@csrf_exempt
@require_POST
def user_login_api(request: HttpRequest) -> JsonResponse:
    """POST /api/login/ -> 200 {id}; 400 invalid body; 401 for any refusal, never saying why."""
    try:
        body = UserLoginBody.model_validate_json(request.body)
    except pydantic.ValidationError as exc:
        return _bad_request(_pydantic_problems(exc))
    try:
        user = user_login(
            username=body.username,
            password=body.password,
            remote_addr=request.META.get("REMOTE_ADDR"),
            user_agent=request.META.get("HTTP_USER_AGENT"),
        )
    except InvalidCredentialsError:
        return JsonResponse({"error": "invalid credentials"}, status=401)
    # The caller is now known: the request's remaining lines (request_finished) carry it.
    # There is no session middleware, hence no request.user for django-structlog to read.
    structlog.contextvars.bind_contextvars(user_id=user.pk)
    return JsonResponse({"id": user.pk})


def _bad_request(problems: dict[str, list[str]]) -> JsonResponse:
    return JsonResponse({"error": "invalid request", "fields": problems}, status=400)


def _pydantic_problems(exc: pydantic.ValidationError) -> dict[str, list[str]]:
    # Messages only: pydantic's `input` would echo the password back.
    problems: dict[str, list[str]] = {}
    for error in exc.errors(include_url=False, include_input=False):
        field = ".".join(str(part) for part in error["loc"]) or "body"
        problems.setdefault(field, []).append(error["msg"])
    return problems


def _django_problems(exc: ValidationError) -> dict[str, list[str]]:
    # The username is the email: report its errors where the client put the value.
    problems: dict[str, list[str]] = {}
    for field, messages in exc.message_dict.items():
        problems.setdefault("email" if field == "username" else field, []).extend(messages)
    return problems
