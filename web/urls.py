"""URL map: liveness, the outbox slot check, and the accounts JSON API."""

from __future__ import annotations

from django.urls import path

from web.accounts.views import user_create_api, user_login_api
from web.health import health, health_outbox

urlpatterns = [
    path("health/", health, name="health"),
    path("health/outbox", health_outbox, name="health-outbox"),
    path("api/users/", user_create_api, name="user-create"),
    path("api/login/", user_login_api, name="user-login"),
]
