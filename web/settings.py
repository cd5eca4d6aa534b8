"""Django settings, derived from one `WebSettings` read from the environment.

No value here is a literal URL, host or secret: each comes from `web.config`, which documents
the variables. Logging is handed to Django's LOGGING_CONFIG hook (see `web.observability`), so
importing this module has no side effects beyond reading the environment.
"""

from __future__ import annotations

import dj_database_url

from web.config import load_settings
from web.observability import logging_dict_config

_web = load_settings()

SECRET_KEY = _web.django_secret_key.get_secret_value()
DEBUG = _web.django_debug
ALLOWED_HOSTS = _web.django_allowed_hosts

DATABASES = {
    "default": dj_database_url.parse(_web.database_url.get_secret_value(), conn_health_checks=True),
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "django_structlog",
    "web.outbox",
    "web.accounts",
]
# A JSON API without sessions or templates: no session, auth or message middleware.
MIDDLEWARE = [
    # First, so every line of the request (the other middleware's too) carries its request_id.
    "django_structlog.middlewares.RequestMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]
ROOT_URLCONF = "web.urls"
WSGI_APPLICATION = "web.wsgi.application"

USE_TZ = True
TIME_ZONE = "UTC"
LANGUAGE_CODE = "en-us"
USE_I18N = False

LOGGING_CONFIG = "cdc_consumer.observability.configure_logging"  # the one structlog set-up
LOGGING = logging_dict_config(level=_web.log_level, log_format=_web.log_format)

# django-structlog: request_id (and user_id when known) on every line of a request, carried
# into the Celery tasks it sends (task_id, task_name there; web.celery). No client IP: it is
# personal data, and the login audit event already records it where it is needed.
DJANGO_STRUCTLOG_CELERY_ENABLED = True
DJANGO_STRUCTLOG_IP_LOGGING_ENABLED = False

# Project settings, read by our code through django.conf.settings (tests override them there).
ENVIRONMENT = _web.environment  # written into every outbox row; also Sentry's environment
OUTBOX_MAX_CONTEXT_BYTES = _web.outbox_max_context_bytes
SENTRY_DSN = _web.sentry_dsn  # a SecretStr: masked in reprs and Django's debug page
SENTRY_TRACES_SAMPLE_RATE = _web.sentry_traces_sample_rate

# Celery (web/celery.py reads the CELERY_ namespace). Without a broker URL the web app and the
# demo run as before; only the worker and Beat need Redis.
CELERY_BROKER_URL = (
    _web.celery_broker_url.get_secret_value() if _web.celery_broker_url is not None else None
)
CELERY_WORKER_HIJACK_ROOT_LOGGER = False  # Django's LOGGING (structlog) renders every line
CELERY_TASK_ACKS_LATE = True  # both tasks are idempotent: a lost worker's task runs again

# Outbox operations: pruning and the slot check (web/outbox/prune.py, web/outbox/slot.py).
CDC_SLOT = _web.cdc_slot
SLOT_THRESHOLDS = _web.slot_thresholds()
OUTBOX_RETENTION = _web.outbox_retention
OUTBOX_PRUNE_CHUNK_ROWS = _web.outbox_prune_chunk_rows
OUTBOX_SLOTS = _web.outbox_slots  # empty: CDC_SLOT alone
OUTBOX_PRUNE_COMMIT_MARGIN = _web.outbox_prune_commit_margin
OUTBOX_PRUNE_INTERVAL_SECONDS = _web.outbox_prune_interval_seconds
OUTBOX_SLOT_CHECK_INTERVAL_SECONDS = _web.outbox_slot_check_interval_seconds
