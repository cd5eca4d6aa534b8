from __future__ import annotations

from django.apps import AppConfig
from django.utils.module_loading import autodiscover_modules


class OutboxConfig(AppConfig):
    name = "web.outbox"
    label = "outbox"
    verbose_name = "Event outbox"

    def ready(self) -> None:
        # Import every installed app's `events` module, as the admin does with `admin`, so the
        # registry knows each event class (and refuses a doubly claimed type) from startup
        # instead of from whenever the module happens to be imported first.
        autodiscover_modules("events")
