#!/usr/bin/env bash
# The pipeline's ClickHouse users, each holding one role that `python -m cdc_consumer migrate`
# grants on every run (cdc_consumer/roles.py): pipeline_consumer (outbox_writer) for the
# consumer, pipeline_analyst (outbox_analyst) for people and dashboards. The migrator is the
# admin running this (access management on): it runs `migrate`. Safe to run again: it creates
# what is missing and sets the passwords given.
#
#   CLICKHOUSE_USER=admin CLICKHOUSE_PASSWORD=... CLICKHOUSE_WRITER_PASSWORD=... \
#   CLICKHOUSE_ANALYST_PASSWORD=... deploy/clickhouse/users.sh
#
# CLICKHOUSE_HOST names the server (default 127.0.0.1: the one this runs beside, as in the
# image's init).
#
# docker compose runs it once, when the data volume is created (docker-entrypoint-initdb.d).
set -euo pipefail

# A password as a ClickHouse string literal's contents.
literal() {
    local text=${1//\\/\\\\}
    printf '%s' "${text//\'/\\\'}"
}

writer=$(literal "${CLICKHOUSE_WRITER_PASSWORD:?set it to the consumer user password}")
analyst=$(literal "${CLICKHOUSE_ANALYST_PASSWORD:?set it to the analyst user password}")

clickhouse client --user "${CLICKHOUSE_USER:-default}" --password "${CLICKHOUSE_PASSWORD:-}" \
    --host "${CLICKHOUSE_HOST:-127.0.0.1}" --multiquery <<SQL
CREATE ROLE IF NOT EXISTS outbox_writer;
CREATE ROLE IF NOT EXISTS outbox_analyst;
CREATE USER IF NOT EXISTS pipeline_consumer;
ALTER USER pipeline_consumer IDENTIFIED WITH sha256_password BY '${writer}';
GRANT outbox_writer TO pipeline_consumer;
ALTER USER pipeline_consumer DEFAULT ROLE outbox_writer;
CREATE USER IF NOT EXISTS pipeline_analyst;
ALTER USER pipeline_analyst IDENTIFIED WITH sha256_password BY '${analyst}';
GRANT outbox_analyst TO pipeline_analyst;
ALTER USER pipeline_analyst DEFAULT ROLE outbox_analyst;
SQL
