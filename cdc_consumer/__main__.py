"""CLI: `python -m cdc_consumer run | migrate [--print-clickhouse-ddl] | status [--json] | health |
backfill --since T | verify --since T [--until U] [--json] | adopt`.

The entry point is the only place that reads the environment, configures logging and Sentry,
and wires the parts together. A configuration error (a bad variable or argument) exits 2, as
does a command that could not do its work; `status`, `health` and `verify` exit 1 for what
they found wrong.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime

import structlog

from cdc_consumer import backfill, clickhouse, postgres, provisioning, verify
from cdc_consumer.clickhouse_sink import ClickHouseSink
from cdc_consumer.errors import PipelineError
from cdc_consumer.metrics import OFF, Metrics, PrometheusMetrics
from cdc_consumer.observability import configure_logging, configure_sentry, logging_dict_config
from cdc_consumer.pipeline import Pipeline, StopRequest
from cdc_consumer.progress import REFRESH_SECONDS
from cdc_consumer.replication import ReplicationStream
from cdc_consumer.settings import ConsumerSettings, load_settings, postgres_identifier
from cdc_consumer.status import Severity, SlotReport, slot_report

log = structlog.get_logger("cdc_consumer")


def _connect(settings: ConsumerSettings) -> clickhouse.ClickHouseTransport:
    return clickhouse.connect(
        settings.clickhouse_url.get_secret_value(),
        insert_quorum=settings.clickhouse_insert_quorum,
    )


def _migrate(settings: ConsumerSettings) -> clickhouse.ClickHouseTransport:
    transport = _connect(settings)
    provisioning.migrate_all(settings, transport)
    return transport


def cmd_migrate(settings: ConsumerSettings, args: argparse.Namespace) -> int:
    if args.print_clickhouse_ddl:
        # For review before a cluster is migrated: what this configuration would apply to an
        # empty database. Connects to nothing.
        ddl = provisioning.clickhouse_ddl(
            cluster=settings.clickhouse_cluster, fsync=settings.clickhouse_fsync_after_insert
        )
        print(ddl, end="")
        return 0
    _migrate(settings).close()
    return 0


def _metrics(settings: ConsumerSettings) -> Metrics:
    """Serving from the start, so a consumer stuck migrating is up but not streaming."""
    if settings.cdc_metrics_port is None:
        return OFF
    metrics = PrometheusMetrics()
    metrics.serve(settings.cdc_metrics_port)
    log.info("serving metrics", port=settings.cdc_metrics_port)
    return metrics


def cmd_run(settings: ConsumerSettings, _args: argparse.Namespace) -> int:
    stop = StopRequest()
    stop.install()
    metrics = _metrics(settings)
    transport = _checked(settings, slot=True)
    sink = ClickHouseSink(transport, source=settings.source, cluster=settings.clickhouse_cluster)
    try:
        return Pipeline(settings, sink, stop, metrics).run()
    finally:
        sink.close()


def _report(settings: ConsumerSettings) -> SlotReport:
    with postgres.connect(settings.database_url.get_secret_value(), autocommit=True) as conn:
        return slot_report(conn, settings.cdc_slot, settings.slot_thresholds())


def cmd_status(settings: ConsumerSettings, args: argparse.Namespace) -> int:
    """The slot check; exit 1 when it is critical (missing, lost, past a critical threshold)."""
    report = _report(settings)
    if args.json:
        print(json.dumps(report.as_dict()))
    else:
        for key, value in report.as_dict().items():
            print(f"{key:>24}: {value}")
    return 1 if report.severity is Severity.CRITICAL else 0


def cmd_health(settings: ConsumerSettings, _args: argparse.Namespace) -> int:
    """Liveness for compose: exit 0 while a consumer streams the slot and has recorded
    progress recently (it refreshes it every REFRESH_SECONDS at least), else 1."""
    report = _report(settings)
    stale_after = 3 * max(settings.cdc_status_interval_seconds, REFRESH_SECONDS)
    with postgres.connect(settings.database_url.get_secret_value(), autocommit=True) as conn:
        row = conn.execute(
            "SELECT extract(epoch FROM clock_timestamp() - updated_at) FROM cdc_progress"
            " WHERE slot = %s",
            (settings.cdc_slot,),
        ).fetchone()
    alive = report.active and row is not None and float(row[0]) < stale_after
    print(json.dumps({"slot": settings.cdc_slot, "alive": alive}))
    return 0 if alive else 1


def cmd_backfill(settings: ConsumerSettings, args: argparse.Namespace) -> int:
    # The backfill makes the slot itself, and a new shard's publication (docs/operations.md,
    # 'Several consumers').
    transport = _checked(settings, slot=False, publication=False)
    try:
        result = backfill.backfill(settings, transport, args.since, replaces=args.replaces)
    finally:
        transport.close()
    print(json.dumps(result.as_dict()))
    return 0


def cmd_verify(settings: ConsumerSettings, args: argparse.Namespace) -> int:
    """Compare the outbox with ClickHouse over the window; exit 1 if any event is missing or
    doubled. Reads only: it migrates nothing."""
    transport = _connect(settings)
    try:
        report = verify.verify(
            settings.database_url.get_secret_value(),
            transport,
            slot=settings.cdc_slot,
            source=settings.source,
            shard=settings.cdc_shard,
            cluster=settings.clickhouse_cluster,
            since=args.since,
            until=args.until,
        )
    finally:
        transport.close()
    print(json.dumps(report.as_dict()) if args.json else verify.summary(report))
    return 0 if report.whole else 1


def cmd_adopt(settings: ConsumerSettings, _args: argparse.Namespace) -> int:
    """Record the PostgreSQL DATABASE_URL names (its system identifier, database, timeline)
    and CDC_SLOT as this source's, after a major-version upgrade (docs/runbook-failover.md)."""
    transport = _checked(settings, slot=False)
    sink = ClickHouseSink(transport, source=settings.source, cluster=settings.clickhouse_cluster)
    try:
        stream = ReplicationStream.connect(
            settings.database_url.get_secret_value(), settings.cdc_slot, settings.cdc_publication
        )
        try:
            identity, history = stream.identify()
            slot = stream.slot_state()
        finally:
            stream.close()
        adopted = sink.adopt_source(identity, history, slot_lsn=slot.confirmed_flush_lsn)
    finally:
        sink.close()
    log.warning("source adopted", **adopted)
    print(json.dumps(adopted))
    return 0


def _checked(
    settings: ConsumerSettings, *, slot: bool, publication: bool = True
) -> clickhouse.ClickHouseTransport:
    """ClickHouse, once both schemas are found migrated: these commands run with roles that
    may not migrate (cdc_consumer/roles.py), so they refuse instead, naming `migrate`."""
    transport = _connect(settings)
    try:
        provisioning.check_migrated(settings, transport, slot=slot, publication=publication)
    except BaseException:
        transport.close()
        raise
    return transport


def _aware_time(text: str) -> datetime:
    value = datetime.fromisoformat(text)
    if value.tzinfo is None:
        raise argparse.ArgumentTypeError("needs a UTC offset, e.g. 2026-11-25T07:00:00+00:00")
    return value


def _sources(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    for name in names:
        try:
            postgres_identifier(name)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{name!r} {exc}") from None
    return names


COMMANDS = {
    "run": cmd_run,
    "migrate": cmd_migrate,
    "status": cmd_status,
    "health": cmd_health,
    "backfill": cmd_backfill,
    "verify": cmd_verify,
    "adopt": cmd_adopt,
}
# Commands that need --since (and the only ones that take it, or --until).
_WINDOWED = {"backfill", "verify"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cdc_consumer", description=__doc__)
    parser.add_argument("command", choices=sorted(COMMANDS))
    parser.add_argument("--json", action="store_true", help="status, verify: one JSON object")
    parser.add_argument(
        "--since",
        type=_aware_time,
        help="backfill: re-ship outbox rows committed at or after this ISO 8601 time; verify:"
        " check outbox rows created at or after it",
    )
    parser.add_argument(
        "--until",
        type=_aware_time,
        help="verify: check outbox rows created before this ISO 8601 time (default: now)",
    )
    parser.add_argument(
        "--replaces",
        type=_sources,
        default=(),
        help="backfill: the CDC_SOURCE of each consumer (comma-separated) this one takes over"
        " from; their slots must be gone",
    )
    parser.add_argument(
        "--print-clickhouse-ddl",
        action="store_true",
        help="migrate: print the ClickHouse DDL it would apply (CLICKHOUSE_CLUSTER), apply nothing",
    )
    args = parser.parse_args(argv)
    if args.print_clickhouse_ddl and args.command != "migrate":
        parser.error("--print-clickhouse-ddl goes with migrate")
    if args.command in _WINDOWED and args.since is None:
        parser.error(f"{args.command} needs --since, an ISO 8601 time with its offset")
    if args.until is not None and args.command != "verify":
        parser.error("--until goes with verify")
    if args.replaces and args.command != "backfill":
        parser.error("--replaces goes with backfill")
    try:
        settings = load_settings()
    except SystemExit as exc:
        # The one line naming the variable, with the exit code of every configuration error
        # (verify's 1 means it found events missing or doubled).
        print(exc.code, file=sys.stderr)
        return 2
    configure_logging(logging_dict_config(level=settings.log_level, log_format=settings.log_format))
    configure_sentry(
        dsn=settings.sentry_dsn,
        environment=settings.environment,
        traces_sample_rate=settings.sentry_traces_sample_rate,
    )
    try:
        return COMMANDS[args.command](settings, args)
    except PipelineError as exc:
        log.error("command failed", command=args.command, error=str(exc), hint=exc.hint)
        return 2


if __name__ == "__main__":
    sys.exit(main())
