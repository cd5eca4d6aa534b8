"""URL map: liveness and the accounts JSON API."""

from __future__ import annotations

from django.urls import path

from web.accounts.views import user_create_api
from web.health import health

urlpatterns = [
    path("health/", health, name="health"),
    path("api/users/", user_create_api, name="user-create"),
]
