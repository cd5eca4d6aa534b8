"""What the shape of `event_context` costs ClickHouse at insert, and at query: the same rows into
event_log-shaped tables that differ only in that column.

    .venv/bin/python bench/bench_json_column.py [--rows 200000] [--batch 50000] [--repeats 3]

Variants, each keeping the context queryable as JSON (`event_context.email` and the like):
- `json`: `JSON`, today's event_log;
- `json_typed`: `JSON` with the paths every event type shares declared with their types;
- `json_16_paths`: `JSON(max_dynamic_paths = 16)`, fewer paths kept as subcolumns;
- `alias_of_raw`: no stored JSON; `event_context` an ALIAS parsing `event_context_raw` when read;
- `string_only`: the raw text alone (the floor: nothing parsed, nothing queryable as JSON).

The rows are JSONEachRow as the consumer encodes them (context both as an object and as its
raw text), inserted through chDB in process in batches of --batch, each table fresh; the best of
--repeats is kept. Then one filter on a context path over the whole table, best of --repeats.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.measure import where_and_when
from cdc_consumer.clickhouse import ChdbTransport

_COMMON = """
    event_id UUID, event_type LowCardinality(String), event_date_time DateTime64(6, 'UTC'),
    environment LowCardinality(String), {context}, event_context_raw String CODEC(ZSTD(3)),
    metadata_version UInt64, source LowCardinality(String), source_lsn UInt64, source_seq UInt32
"""
VARIANTS = {
    "json": "event_context JSON",
    "json_typed": "event_context JSON(email String, first_name String, last_name String,"
    " plan String, n UInt64)",
    "json_16_paths": "event_context JSON(max_dynamic_paths = 16)",
    "alias_of_raw": "event_context JSON ALIAS CAST(event_context_raw, 'JSON')",
    "string_only": "",
}
_ENGINE = (
    " ENGINE = ReplacingMergeTree PARTITION BY toYYYYMM(event_date_time)"
    " ORDER BY (event_type, event_date_time, event_id)"
)


def _rows(count: int) -> list[bytes]:
    rows = []
    for n in range(count):
        context = orjson.dumps(
            {
                "email": f"user{n}@bench.example",
                "first_name": "Ada",
                "last_name": "Lovelace",
                "plan": "pro",
                "n": n,
            }
        )
        rows.append(
            b'{"event_id":"%s","event_type":"user_created",'
            b'"event_date_time":"2026-12-01 10:%02d:%02d.%06d",'
            b'"environment":"bench","event_context":%s,"event_context_raw":%s,"metadata_version":1,'
            b'"source":"bench","source_lsn":%d,"source_seq":0}'
            % (
                f"0190a5a0-0000-7000-8000-{n:012d}".encode(),
                (n // 60_000_000) % 60,
                (n // 1_000_000) % 60,
                n % 1_000_000,
                context,
                orjson.dumps(context.decode()),
                n,
            )
        )
    return rows


def _table(name: str) -> str:
    context = VARIANTS[name]
    columns = _COMMON.format(context=context) if context else _COMMON.replace("{context}, ", "")
    return f"CREATE TABLE t_{name} ({columns}){_ENGINE}"


def _columns(name: str) -> str:
    names = ["event_id", "event_type", "event_date_time", "environment"]
    if name not in ("alias_of_raw", "string_only"):
        names.append("event_context")
    names += ["event_context_raw", "metadata_version", "source", "source_lsn", "source_seq"]
    return ", ".join(names)


def _insert_seconds(transport: ChdbTransport, name: str, batches: list[list[bytes]]) -> float:
    transport.command(f"DROP TABLE IF EXISTS t_{name} SYNC")
    transport.command(_table(name))
    columns = _columns(name).split(", ")
    started = time.perf_counter()
    for rows in batches:
        # The consumer's rows carry event_context; a table without it skips the field.
        transport.insert(
            f"t_{name}",
            rows,
            columns=columns,
            query_id="",
            settings={"input_format_skip_unknown_fields": "1"},
        )
    return time.perf_counter() - started


def _query_seconds(transport: ChdbTransport, name: str) -> float:
    path = (
        "JSONExtractString(event_context_raw, 'plan')"
        if name == "string_only"
        else "event_context.plan::String"
    )
    started = time.perf_counter()
    transport.select(f"SELECT count() FROM t_{name} WHERE {path} = 'pro'")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = _rows(args.rows)
    batches = [rows[i : i + args.batch] for i in range(0, len(rows), args.batch)]
    result: dict[str, object] = {"rows": args.rows, "batch": args.batch}
    with tempfile.TemporaryDirectory(prefix="bench-json-") as directory:
        transport = ChdbTransport(str(Path(directory) / "ch"))
        try:
            for name in VARIANTS:
                insert = min(_insert_seconds(transport, name, batches) for _ in range(args.repeats))
                query = min(_query_seconds(transport, name) for _ in range(args.repeats))
                result[f"{name}_insert_rows_per_s"] = round(args.rows / insert)
                result[f"{name}_query_ms"] = round(query * 1000, 1)
        finally:
            transport.close()
    print(json.dumps({**result, **where_and_when()}))


if __name__ == "__main__":
    main()
