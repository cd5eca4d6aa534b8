"""The WSGI entry point (gunicorn, and `manage.py runserver` through WSGI_APPLICATION)."""

from __future__ import annotations

import os

from django.core.wsgi import get_wsgi_application

from web.observability import configure_web_sentry

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "web.settings")

# Before the handler is built, so Sentry's Django integration wraps the middleware it loads.
configure_web_sentry()
application = get_wsgi_application()
