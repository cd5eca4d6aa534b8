"""Consumer configuration, read once from the environment (12-factor) in the entry point.

Nothing else in the consumer reads `os.environ`: the settings object is built in `__main__`
and passed down. A missing or malformed variable stops the process with one line naming it.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from collections.abc import Mapping
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from cdc_consumer.clickhouse_cluster import InsertQuorum
from cdc_consumer.observability import ObservabilitySettings
from cdc_consumer.outbox import OUTBOX_SCHEMA, OUTBOX_TABLE
from cdc_consumer.shard import Shard
from cdc_consumer.status import SlotThresholds

_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_QUALIFIED_TABLE = re.compile(r"^[a-z_][a-z0-9_$]{0,62}\.[a-z_][a-z0-9_$]{0,62}$")
# A cluster name from the server's remote_servers, or a macro naming one (`{cluster}`).
_CLUSTER = re.compile(r"^(?:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}|\{[A-Za-z0-9_]{1,64}\})$")


def postgres_identifier(value: str) -> str:
    # Slot and publication names go into replication commands that take no parameters
    # (the walsender speaks only the simple-query protocol), so they are validated here.
    if not _IDENTIFIER.match(value):
        raise ValueError("must be a lowercase identifier: letters, digits, underscore")
    return value


def _ignored_tables(value: str) -> str:
    # `schema.table` names pgoutput reports (no quoting: such tables are named by the same
    # rule as our own identifiers); never the outbox, whose rows would then vanish.
    for name in filter(None, (part.strip() for part in value.split(","))):
        if not _QUALIFIED_TABLE.match(name):
            raise ValueError(f"{name!r} is not a lowercase schema.table name")
        if name == f"{OUTBOX_SCHEMA}.{OUTBOX_TABLE}":
            raise ValueError(f"{name} is the outbox: its rows are the events")
    return value


def _shard(value: object) -> Shard | None:
    if isinstance(value, str):
        return Shard.parse(value) if value.strip() else None
    return value  # type: ignore[return-value]  # a Shard, or None: pydantic checks it


def _clickhouse_url(value: SecretStr) -> SecretStr:
    parts = urlsplit(value.get_secret_value())
    if parts.scheme not in {"http", "https", "chdb"}:
        raise ValueError("must be http(s)://user:pass@host:port/db or chdb:///path")
    if parts.scheme == "chdb" and not parts.path:
        raise ValueError("chdb:// needs a data directory, e.g. chdb:///var/lib/event_log")
    if parts.scheme != "chdb" and not parts.hostname:
        raise ValueError("needs a host")
    return value


def postgres_url(value: SecretStr) -> SecretStr:
    """DATABASE_URL's check, shared with the web app's settings."""
    if urlsplit(value.get_secret_value()).scheme not in {"postgres", "postgresql"}:
        raise ValueError("must be postgresql://user:pass@host:port/db")
    return value


def _clickhouse_cluster(value: str | None) -> str | None:
    if value and not _CLUSTER.match(value):
        raise ValueError(
            "must be a cluster name (letters, digits, _ . -) or a macro like {cluster}"
        )
    return value or None  # empty, as .env files spell "unset": one server


_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off", ""})


def _boolean(value: object) -> object:
    # Parsed here for one plain line on a bad value; empty, as .env files spell "unset", is
    # false (the default).
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError("must be true or false")


def _insert_quorum(value: object) -> object:
    # Parsed here, not by pydantic's int | 'auto' union, so a bad value gets one line, not one
    # per member; empty is unset (off), as for CLICKHOUSE_CLUSTER.
    text = str(value).strip() or "0"
    if text == "auto":
        return text
    # ClickHouse treats a quorum below 2 as none: accepting 1 would promise what it is not.
    if not (text.isascii() and text.isdigit()) or int(text) == 1:
        raise ValueError("must be 0 (off), 2 or more, or auto (ClickHouse ignores a quorum of 1)")
    return int(text)


def _metrics_port(value: object) -> object:
    # Parsed here for one plain line on a bad value; empty, as .env files spell "unset", is
    # unset (metrics off).
    text = "" if value is None else str(value).strip()
    if not text:
        return None
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= 65535:
        raise ValueError("must be a TCP port, 1 to 65535 (unset or empty: no metrics endpoint)")
    return int(text)


def _empty_is_false(value: object) -> object:
    # Empty, as .env files spell "unset", is the default (off), as for CLICKHOUSE_CLUSTER.
    return False if isinstance(value, str) and not value.strip() else value


Identifier = Annotated[str, AfterValidator(postgres_identifier)]

_GIB = 1024**3


class SlotCheckSettings(BaseSettings):
    """The slot and the thresholds it is judged by. Shared by the consumer (`status`, `health`)
    and the web app (health view, Celery slot check), so both judge the slot alike."""

    model_config = SettingsConfigDict(extra="ignore", case_sensitive=False)

    cdc_slot: Identifier = "event_outbox_slot"
    # Retained WAL behind the slot. Critical well before max_slot_wal_keep_size (10 GB in
    # postgres.conf) invalidates the slot, so someone acts while it can still catch up.
    cdc_lag_warning_bytes: int = Field(default=1 * _GIB, ge=0)
    cdc_lag_critical_bytes: int = Field(default=5 * _GIB, ge=0)
    # Seconds since the consumer last moved the slot forward, counted only while there is lag.
    cdc_stall_warning_seconds: float = Field(default=300.0, ge=0)
    cdc_stall_critical_seconds: float = Field(default=1800.0, ge=0)

    def slot_thresholds(self) -> SlotThresholds:
        return SlotThresholds(
            lag_warning_bytes=self.cdc_lag_warning_bytes,
            lag_critical_bytes=self.cdc_lag_critical_bytes,
            stall_warning_seconds=self.cdc_stall_warning_seconds,
            stall_critical_seconds=self.cdc_stall_critical_seconds,
        )


class ConsumerSettings(SlotCheckSettings, ObservabilitySettings):
    """Everything the consumer can be told. Defaults are production-sane; see .env.example.
    Logging and Sentry variables are ObservabilitySettings', shared with the web app."""

    database_url: Annotated[SecretStr, AfterValidator(postgres_url)]
    clickhouse_url: Annotated[SecretStr, AfterValidator(_clickhouse_url)]

    cdc_publication: Identifier = "event_outbox_pub"
    # Scale-out: this consumer is shard k of N (`k/N`) and streams only its share of the outbox,
    # on its own slot, publication and source (docs/operations.md, 'Several consumers').
    # Unset: one consumer streams it all.
    cdc_shard: Annotated[Shard | None, BeforeValidator(_shard)] = None
    # PostgreSQL 17+: create the slot as a failover slot, which a standby with
    # sync_replication_slots keeps in step, so a promoted standby still has it
    # (docs/runbook-failover.md). `migrate` refuses it on an older server.
    cdc_slot_failover: Annotated[bool, BeforeValidator(_boolean)] = False
    # The name this consumer's rows carry in event_log; it scopes the restart read, the fence
    # and the backfill. Defaults to the slot's name. Two PostgreSQL servers writing one
    # event_log need distinct names (a clash is refused at startup, never merged).
    cdc_source: Identifier | None = None
    # Tables in the publication that are not the outbox stop the consumer, since silently
    # dropping their rows would also drop a renamed or partitioned outbox's events. Listing one
    # here (comma-separated schema.table) is the operator saying its rows are not events: they
    # are skipped. The escape for a table published by mistake, whose rows the slot replays
    # even after it leaves the publication.
    cdc_ignored_tables: Annotated[str, AfterValidator(_ignored_tables)] = ""
    # ClickHouse guidance: >= 1,000 rows per insert, ideally 10k-100k, about one insert a second.
    # The row bound stays under the block size the sink pins (clickhouse_sink.INSERT_SETTINGS),
    # so a batch is one block per partition; no batch exceeds either limit (one row larger
    # than the byte limit goes alone).
    cdc_batch_max_rows: int = Field(default=50_000, ge=1, le=1_000_000)
    cdc_batch_max_bytes: int = Field(default=32 * 1024 * 1024, ge=1024, le=256 * 1024 * 1024)
    cdc_batch_max_seconds: float = Field(default=1.0, gt=0, le=600)
    # Must stay well inside the server's wal_sender_timeout (60 s in postgres.conf).
    cdc_status_interval_seconds: float = Field(default=10.0, gt=0, le=300)
    cdc_retry_max_seconds: float = Field(default=30.0, gt=0)
    cdc_shutdown_grace_seconds: float = Field(default=30.0, gt=0)
    # Prometheus metrics (docs/metrics.md) on http://0.0.0.0:<port>/metrics; unset: none.
    cdc_metrics_port: Annotated[int | None, BeforeValidator(_metrics_port)] = None

    # A ClickHouse cluster (docs/adr/0005-clickhouse-cluster.md): the schema is created ON
    # CLUSTER on replicated engines, and the fence of earlier runs reaches every host. Unset or
    # empty: one server.
    clickhouse_cluster: Annotated[str | None, BeforeValidator(_clickhouse_cluster)] = None
    # Replicas that must hold an insert before ClickHouse acknowledges it (and so before the
    # slot is confirmed); 0 is off, 'auto' a majority of the replicas.
    clickhouse_insert_quorum: Annotated[InsertQuorum, BeforeValidator(_insert_quorum)] = 0
    # Whether ClickHouse fsyncs each inserted part (and its directory) before acknowledging the
    # insert, and so before the slot is confirmed past it. Off, an OS crash or power loss on a
    # single server can lose parts ClickHouse already acknowledged; on, every insert pays for
    # the fsyncs (docs/benchmarks.md, "fsync"). Table settings, applied by `migrate`.
    clickhouse_fsync_after_insert: Annotated[bool, BeforeValidator(_empty_is_false)] = False

    @field_validator("clickhouse_cluster")
    @classmethod
    def _cluster_needs_a_server(cls, value: str | None, info: ValidationInfo) -> str | None:
        url = info.data.get("clickhouse_url")
        if value and url is not None and urlsplit(url.get_secret_value()).scheme == "chdb":
            raise ValueError(
                "needs an http(s) CLICKHOUSE_URL: the embedded chdb:// engine is one server"
            )
        return value

    @field_validator("clickhouse_insert_quorum")
    @classmethod
    def _quorum_needs_a_cluster(cls, value: InsertQuorum, info: ValidationInfo) -> InsertQuorum:
        # On a table that is not replicated ClickHouse ignores the quorum: refuse to imply it.
        # (A cluster that failed its own check is missing from info.data: already reported.)
        if value != 0 and "clickhouse_cluster" in info.data and not info.data["clickhouse_cluster"]:
            raise ValueError("needs CLICKHOUSE_CLUSTER: only replicated tables have a quorum")
        return value

    @property
    def ignored_tables(self) -> frozenset[tuple[str, str]]:
        """CDC_IGNORED_TABLES as (schema, table) pairs."""
        names = (part.strip() for part in self.cdc_ignored_tables.split(","))
        return frozenset(
            (schema, table) for schema, _, table in (n.partition(".") for n in names if n)
        )

    @property
    def source(self) -> str:
        """CDC_SOURCE, or the slot's name when it is not set."""
        return self.cdc_source or self.cdc_slot


def load_settings() -> ConsumerSettings:
    """Build settings from the environment or exit with one line naming the bad variable."""
    warn_unknown_variables("CDC_", ConsumerSettings)
    try:
        return ConsumerSettings()  # type: ignore[call-arg]  # fields come from the environment
    except ValidationError as exc:
        raise SystemExit(describe_invalid_settings(exc)) from None


def unknown_variables(
    prefix: str, settings: type[BaseSettings], environ: Mapping[str, str]
) -> list[str]:
    """One line per variable of `environ` starting with `prefix` that `settings` does not read,
    with the nearest name it does: a misspelled variable would otherwise be ignored silently
    and its setting left at the default. Each prefix belongs to one process's settings (CDC_ to
    the consumer's, which include the slot check's; OUTBOX_ to the web app's)."""
    known = [name.upper() for name in settings.model_fields]
    lines = []
    for name in sorted(n for n in environ if n.upper().startswith(prefix)):
        if name.upper() in known:
            continue
        near = difflib.get_close_matches(name.upper(), known, n=1)
        hint = f" (did you mean {near[0]}?)" if near else ""
        lines.append(f"configuration warning: {name} is not a setting, ignored{hint}")
    return lines


def warn_unknown_variables(prefix: str, settings: type[BaseSettings]) -> None:
    for line in unknown_variables(prefix, settings, os.environ):
        print(line, file=sys.stderr)


def describe_invalid_settings(exc: ValidationError) -> str:
    """One line per bad variable, naming it as the operator typed it (upper case), never its
    value (it may hold a password). The web app's settings use it too."""
    lines = []
    for error in exc.errors():
        name = str(error["loc"][0]).upper() if error["loc"] else "?"
        if error["type"] == "missing":
            reason = "is required"
        elif error["type"] == "value_error":
            # Our own validators' words, without pydantic's "Value error, " prefix.
            reason = str(error.get("ctx", {}).get("error", error["msg"]))
        else:
            reason = error["msg"]
        lines.append(f"configuration error: {name} {reason}")
    return "\n".join(lines)
