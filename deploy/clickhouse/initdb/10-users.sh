#!/usr/bin/env bash
# docker compose: the pipeline's ClickHouse users (deploy/clickhouse/users.sh), made once, when
# the data volume is created, by the image's entrypoint while the server listens locally.
set -euo pipefail
/etc/clickhouse-server/pipeline-users.sh
