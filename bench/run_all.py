"""Every benchmark on the embedded defaults, one after another, and the figures table at the top
of docs/benchmarks.md rewritten from what they printed (figure, target, command, date, machine).

    make bench                                     # all of them, about 15 minutes on 2 cores
    .venv/bin/python -m bench.run_all --only drain,latency [--no-write]

Each benchmark is its own process and prints JSON; a run that fails stops nothing else and its
rows say so. Ratios come from one run of one benchmark (the drain's two ceilings are measured
beside the consumer), never from figures of different runs. The rest of docs/benchmarks.md, the
analyses with their own dated figures, is written by hand.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- make bench: begin -->", "<!-- make bench: end -->"

Result = dict[str, Any]
# A figure: what it is, its value, the target (or ""), whether the target is met (None: no
# target), from the benchmark's JSON lines.
Figure = tuple[str, str, str, bool | None]


@dataclass(frozen=True)
class Run:
    name: str  # what --only selects
    args: tuple[str, ...]  # bench/<script> and its arguments
    figures: Callable[[list[Result]], list[Figure]]

    @property
    def command(self) -> str:
        return ".venv/bin/python " + shlex.join(self.args)


def _rate(value: float) -> str:
    return f"{value:,.0f}/s"


def _drain(transport: str) -> Callable[[list[Result]], list[Figure]]:
    def figures(results: list[Result]) -> list[Figure]:
        [r] = results
        ceilings = (
            f"pg_recvlogical {_rate(r['pg_recvlogical_events_per_s'])}, ClickHouse alone"
            f" {_rate(r['clickhouse_ingest_events_per_s'])}"
        )
        ratio = r["ratio_to_slower_ceiling"]
        rows: list[Figure] = [
            (
                f"drain of {r['events']:,} events, {transport}: consumer",
                f"{_rate(r['consumer_events_per_s'])} ({ceilings})",
                "",
                None,
            ),
            (
                f"drain, {transport}: consumer ÷ slower ceiling",
                f"{ratio:.2f} (÷ the bound all CPU seconds on the shared cores set:"
                f" {r['ratio_to_cores_bound']:.2f})",
                "≥ 0.85",
                ratio >= 0.85,
            ),
        ]
        cpu = r["consumer_cpu_us_per_event"]
        if transport == "http":
            rows.append((f"consumer CPU per event, {transport}", f"{cpu} µs", "≤ 10 µs", cpu <= 10))
            rss = r["consumer_peak_rss_mb"]
            rows.append(("catch-up peak RSS, http", f"{rss} MB", "≤ 200 MB", rss <= 200))
        else:
            rows.append(
                (f"consumer CPU per event, {transport} (engine included)", f"{cpu} µs", "", None)
            )
            rows.append(
                (
                    f"catch-up peak RSS, {transport} (engine included)",
                    f"{r['consumer_peak_rss_mb']} MB",
                    "",
                    None,
                )
            )
        rows.append(
            (
                f"drain, {transport}: inserts",
                f"{r['clickhouse_inserts']} of {r['rows_per_insert']:,} rows",
                "",
                None,
            )
        )
        return rows

    return figures


def _latency(rate: int, batch_seconds: float) -> Callable[[list[Result]], list[Figure]]:
    def figures(results: list[Result]) -> list[Figure]:
        [r] = results
        bound = batch_seconds + 0.15
        rows: list[Figure] = [
            (
                f"commit → queryable at {rate:,}/s, CDC_BATCH_MAX_SECONDS={batch_seconds}",
                f"p50 {r['latency_p50_s']} s, p99 {r['latency_p99_s']} s, max"
                f" {r['latency_max_s']} s",
                f"p99 ≤ {bound:.2f} s",
                r["latency_p99_s"] <= bound,
            ),
        ]
        inserts = f"{r['inserts_per_s']} inserts/s of {r['rows_per_insert']:,} rows"
        if batch_seconds >= 1.0:
            target, met = "≤ 1 insert/s", r["inserts_per_s"] <= 1.0
            if rate >= 10_000:
                target += ", ≥ 10,000 rows/insert"
                met = met and r["rows_per_insert"] >= 10_000
            rows.append((f"inserts at {rate:,}/s, {batch_seconds} s batches", inserts, target, met))
        else:
            rows.append((f"inserts at {rate:,}/s, {batch_seconds} s batches", inserts, "", None))
        return rows

    return figures


def _publish(results: list[Result]) -> list[Figure]:
    [r] = results
    return [
        (
            "publish() inside a request",
            f"p50 {r['publish']['p50_us']} µs, p99 {r['publish']['p99_us']} µs",
            "",
            None,
        ),
        ("publish_many()", _rate(r["many_events_per_s_median"]), "", None),
    ]


def _relay(results: list[Result]) -> list[Figure]:
    [r] = results
    return [
        (
            f"polling relay (bench only): backlog of {r['backlog_events']:,}",
            f"{_rate(r['backlog_events_per_s'])}; left in PostgreSQL per event:"
            f" {r['relay_wal_bytes_per_event']} WAL bytes, {r['dead_tuples_per_event']} dead"
            " tuples (the WAL consumer: none)",
            "",
            None,
        ),
        (
            f"polling relay at {r['rate']:,}/s, polling every {r['poll_seconds']} s",
            f"p50 {r['latency_p50_s']} s, p99 {r['latency_p99_s']} s, max {r['latency_max_s']} s;"
            f" {r['inserts_per_s']} inserts/s of {r['rows_per_insert']:,} rows",
            "",
            None,
        ),
    ]


def _verify(results: list[Result]) -> list[Figure]:
    [r] = results
    return [
        (
            f"verify over {r['events']:,} events",
            f"{r['verify_seconds']} s ({_rate(r['verify_events_per_s'])}), peak RSS"
            f" {r['verify_peak_rss_mb']} MB",
            "",
            None,
        )
    ]


def _outbox_prune(results: list[Result]) -> list[Figure]:
    [r] = results
    return [
        (
            f"outbox_prune over {r['rows']:,} rows",
            f"{_rate(r['full_prune_rows_per_s'])} deleted; an idle prune {r['empty_prune_s']} s",
            "",
            None,
        )
    ]


def _fsync(results: list[Result]) -> list[Figure]:
    """The cost per 1,000-row insert, the consumer's size at about 1,000 events/s: at 10,000 and
    50,000 rows it is within this machine's noise (docs/benchmarks.md, "fsync")."""
    [r] = results
    measured = r["results"]
    off, on = (measured.get(f"1000_{mode}", {}).get("p50_ms") for mode in ("off", "on"))
    cost = measured.get("1000_cost", {})
    return [
        (
            "fsync after insert, 1,000-row insert",
            f"{cost.get('extra_ms_p50', 0):+.1f} ms p50 (off {off} → on {on} ms)",
            "",
            None,
        )
    ]


def _scale_out(results: list[Result]) -> list[Figure]:
    [r] = results
    n = r["shards"]
    one, many = r["one_consumer"], r[f"{n}_shards"]
    return [
        (
            f"scale-out, {r['events']:,} events, http: {n} shards together vs one consumer",
            f"{_rate(many['events_per_s'])} vs {_rate(one['events_per_s'])} (x{r['speedup']});"
            f" walsender CPU {many['walsender_cpu_us_per_event']} vs"
            f" {one['walsender_cpu_us_per_event']} µs per event",
            "",
            None,
        )
    ]


def _metrics(results: list[Result]) -> list[Figure]:
    [r] = results
    return [
        (
            "metrics per batch of 50,000 (100-row transactions)",
            f"{r['tx_100_on_us_per_batch']} µs",
            "",
            None,
        )
    ]


def _granules(what: str, bounded: str, unbounded: str) -> Callable[[list[Result]], list[Figure]]:
    """Granules a plan reads, from EXPLAIN's `Parts: p/q | Granules: g/h` summary."""

    def read(summary: str) -> str:
        match = re.search(r"Granules: (\d+)", summary)
        return match.group(1) if match else summary

    def figures(results: list[Result]) -> list[Figure]:
        return [
            (
                f"{what}, {r['rows']:,} rows in event_log",
                f"{read(r[bounded])} granules read (before: {read(r[unbounded])})",
                "",
                None,
            )
            for r in results
        ]

    return figures


RUNS = (
    Run(
        "drain",
        ("bench/bench_consumer_drain.py", "--events", "1000000", "--transport", "http"),
        _drain("http"),
    ),
    Run(
        "drain",
        ("bench/bench_consumer_drain.py", "--events", "1000000", "--transport", "chdb"),
        _drain("chdb"),
    ),
    Run(
        "scale-out",
        ("bench/bench_scale_out.py", "--events", "1000000", "--shards", "2"),
        _scale_out,
    ),
    *(
        Run(
            "latency",
            (
                "bench/bench_latency.py",
                "--rate",
                str(rate),
                "--seconds",
                "60",
                "--batch-max-seconds",
                str(age),
            ),
            _latency(rate, age),
        )
        for age in (1.0, 0.1)
        for rate in (1_000, 10_000)
    ),
    Run("relay", ("bench/bench_polling_relay.py",), _relay),
    Run("publish", ("bench/bench_publish.py",), _publish),
    Run("verify", ("bench/bench_verify.py", "--events", "1000000", "--transport", "http"), _verify),
    Run("prune", ("bench/bench_outbox_prune.py", "--rows", "1000000"), _outbox_prune),
    Run("fsync", ("bench/bench_fsync.py",), _fsync),
    Run("metrics", ("bench/bench_metrics.py",), _metrics),
    Run(
        "restart-read",
        ("bench/bench_restart_read.py", "--rows", "10000000"),
        _granules("consumer startup", "startup_granules", "unbounded_granules"),
    ),
    Run(
        "presence",
        ("bench/bench_backfill_presence.py", "--rows", "10000000"),
        _granules("backfill presence check per chunk", "by_time_granules", "by_id_granules"),
    ),
)


def _json_lines(text: str) -> list[Result]:
    found = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                found.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return found


def _run(run: Run) -> tuple[list[Figure], float]:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, *run.args], cwd=ROOT, capture_output=True, text=True, check=False
    )
    seconds = time.monotonic() - started
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
        failed = f"failed (exit {done.returncode}): {tail[0][:120]}"
        return [(run.args[0], failed, "", False)], seconds
    return run.figures(_json_lines(done.stdout)), seconds


def _row(figure: Figure, command: str, context: dict[str, object]) -> str:
    what, value, target, met = (
        figure[0].replace("|", "\\|"),
        figure[1].replace("|", "\\|"),
        figure[2],
        figure[3],
    )
    mark = "" if met is None else (" ✓" if met else " ✗")
    return (
        f"| {what} | {value} | {target}{mark} | `{command}` | {context['date']} |"
        f" {context['machine']} |"
    )


def _kept_rows(text: str) -> dict[str, list[str]]:
    """The table's rows now in docs/benchmarks.md, by the command that made them."""
    if BEGIN not in text or END not in text:
        return {}
    kept: dict[str, list[str]] = {}
    for line in text.split(BEGIN, 1)[1].split(END, 1)[0].splitlines():
        cells = line.split(" | ")
        if line.startswith("| ") and len(cells) >= 6 and cells[3].startswith("`"):
            kept.setdefault(cells[3].strip("`"), []).append(line)
    return kept


def _table(rows: list[str]) -> str:
    return "\n".join(
        [
            BEGIN,
            "Written by `make bench` (`bench/run_all.py`); ✓ a target met, ✗ missed.",
            "",
            "| figure | value | target | command | date (UTC) | machine |",
            "|---|---|---|---|---|---|",
            *rows,
            END,
        ]
    )


def write(table: str) -> None:
    """Put `table` between the markers of docs/benchmarks.md (after the title, the first time)."""
    text = DOC.read_text()
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + table + rest.split(END, 1)[1]
    else:
        title, _, body = text.partition("\n\n")
        text = f"{title}\n\n## Figures\n\n{table}\n\n{body}"
    DOC.write_text(text)


def main() -> None:
    sys.path.insert(0, str(ROOT))
    from bench.measure import where_and_when  # noqa: PLC0415  (after the path is set)

    parser = argparse.ArgumentParser(description=__doc__)
    names = ", ".join(sorted({run.name for run in RUNS}))
    parser.add_argument("--only", help=f"comma-separated, of: {names}; the other rows stay")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args()
    only = set(args.only.split(",")) if args.only else None
    kept = _kept_rows(DOC.read_text())
    rows: list[str] = []
    for run in RUNS:
        if only is not None and run.name not in only:
            rows += kept.get(run.command, [])
            continue
        figures, seconds = _run(run)
        context = where_and_when()
        print(f"{run.command}: {seconds:.0f} s", file=sys.stderr, flush=True)
        rows += [_row(figure, run.command, context) for figure in figures]
    table = _table(rows)
    print(table)
    if not args.no_write:
        write(table)


if __name__ == "__main__":
    main()
