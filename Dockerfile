# One image for every role (web, consumer, Celery worker and Beat, the one-shot migrate); the
# command picks the role (docker-compose.yml). Production talks to PostgreSQL and ClickHouse
# over the network, so the embedded engines (the `embedded` dependency group) are not in it.
# Health is checked per service (docker-compose.yml): each role answers a different question.

FROM python:3.11-slim AS build
ENV UV_PYTHON_DOWNLOADS=never UV_PROJECT_ENVIRONMENT=/opt/venv UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy PIP_DISABLE_PIP_VERSION_CHECK=1
RUN pip install --no-cache-dir uv==0.13.9
WORKDIR /app
# Dependencies first, from the lock alone, so a code change reuses this layer.
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --frozen --no-dev --no-group embedded --no-install-project
COPY cdc_consumer ./cdc_consumer
COPY web ./web
COPY demo ./demo
COPY sql ./sql
COPY manage.py postgres.conf ./
# Installed editable: the package reads sql/ beside its source (migrations.SQL_ROOT), which a
# wheel would not carry; /app is copied whole into the runtime stage below.
RUN uv sync --frozen --no-dev --no-group embedded

FROM python:3.11-slim AS runtime
ARG VERSION=dev
LABEL org.opencontainers.image.title="outbox-to-clickhouse" \
      org.opencontainers.image.description="Event logs from Django to ClickHouse through a PostgreSQL outbox and a pgoutput WAL consumer" \
      org.opencontainers.image.version="${VERSION}"
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PATH=/opt/venv/bin:$PATH
# A numeric user, so a runtime that checks runAsNonRoot can tell without a passwd lookup.
RUN groupadd --system --gid 10001 app && useradd --system --uid 10001 --gid app --no-create-home app
WORKDIR /app
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app
USER 10001:10001
CMD ["python", "-m", "cdc_consumer", "--help"]
