"""CLI: `python -m cdc_consumer run | migrate | status [--json]`.

The entry point is the only place that reads the environment, configures logging and Sentry,
and wires the parts together.
"""

from __future__ import annotations

import argparse
import json
import sys

import psycopg
import structlog

from cdc_consumer import clickhouse, provisioning
from cdc_consumer.errors import PipelineError
from cdc_consumer.observability import configure_logging, configure_sentry
from cdc_consumer.pipeline import Pipeline, StopRequest
from cdc_consumer.settings import ConsumerSettings, load_settings
from cdc_consumer.status import slot_report

log = structlog.get_logger("cdc_consumer")


def _migrate(settings: ConsumerSettings) -> clickhouse.ClickHouseTransport:
    transport = clickhouse.connect(settings.clickhouse_url.get_secret_value())
    provisioning.migrate_all(settings, transport)
    return transport


def cmd_migrate(settings: ConsumerSettings, _args: argparse.Namespace) -> int:
    _migrate(settings).close()
    return 0


def cmd_run(settings: ConsumerSettings, _args: argparse.Namespace) -> int:
    stop = StopRequest()
    stop.install()
    transport = _migrate(settings)
    sink = clickhouse.ClickHouseSink(transport, slot=settings.cdc_slot)
    try:
        return Pipeline(settings, sink, stop).run()
    finally:
        sink.close()


def cmd_status(settings: ConsumerSettings, args: argparse.Namespace) -> int:
    with psycopg.connect(settings.database_url.get_secret_value(), autocommit=True) as conn:
        report = slot_report(conn, settings.cdc_slot)
    if args.json:
        print(json.dumps(report.as_dict()))
    else:
        for key, value in report.as_dict().items():
            print(f"{key:>20}: {value}")
    return 0 if report.exists else 1


COMMANDS = {"run": cmd_run, "migrate": cmd_migrate, "status": cmd_status}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cdc_consumer", description=__doc__)
    parser.add_argument("command", choices=sorted(COMMANDS))
    parser.add_argument("--json", action="store_true", help="status: one JSON object")
    args = parser.parse_args(argv)
    settings = load_settings()
    configure_logging(settings)
    configure_sentry(settings)
    try:
        return COMMANDS[args.command](settings, args)
    except PipelineError as exc:
        log.error("command failed", command=args.command, error=str(exc), hint=exc.hint)
        return 2


if __name__ == "__main__":
    sys.exit(main())
