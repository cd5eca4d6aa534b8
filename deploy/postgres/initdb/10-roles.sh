#!/usr/bin/env bash
# docker compose: the pipeline's login roles (deploy/postgres/roles.sql), made once, when the
# data volume is created, by the image's entrypoint as the bootstrap superuser.
set -euo pipefail
psql -X -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -v migrator_password="${POSTGRES_MIGRATOR_PASSWORD:?}" \
    -v web_password="${POSTGRES_WEB_PASSWORD:?}" \
    -v worker_password="${POSTGRES_WORKER_PASSWORD:?}" \
    -v consumer_password="${POSTGRES_CONSUMER_PASSWORD:?}" \
    -f /etc/postgresql/roles.sql
