"""Micro-benchmark: decode a captured ~240-byte outbox Insert message over and over.

    .venv/bin/python bench/bench_pgoutput.py [iterations]

Prints rows/s for `cdc_consumer.pgoutput.decode` on bytes and on a memoryview (what psycopg
hands back for copy data). The message comes from tests/fixtures/pgoutput/messages.json
(scenario "outbox insert"), i.e. real pgoutput output for a row shaped like event_outbox.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from cdc_consumer.pgoutput import Insert, decode  # noqa: E402

FIXTURE = REPO_ROOT / "tests" / "fixtures" / "pgoutput" / "messages.json"


def outbox_insert() -> bytes:
    rows = json.loads(FIXTURE.read_text())["messages"]
    for row in rows:
        raw = bytes.fromhex(row["hex"])
        if row["scenario"] == "outbox insert" and raw[:1] == b"I":
            return raw
    raise SystemExit("no outbox Insert in the fixture: run tests/fixtures/pgoutput/capture.py")


def rate(data: bytes | memoryview, iterations: int) -> float:
    start = time.perf_counter()
    for _ in range(iterations):
        decode(data)
    return iterations / (time.perf_counter() - start)


def main() -> None:
    iterations = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    raw = outbox_insert()
    decoded = decode(raw)
    assert isinstance(decoded, Insert)
    print(f"message: {len(raw)} bytes, {len(decoded.new)} columns, {iterations:,} decodes")
    rate(raw, min(iterations, 50_000))  # warm up
    print(f"bytes:      {rate(raw, iterations):>12,.0f} rows/s")
    print(f"memoryview: {rate(memoryview(raw), iterations):>12,.0f} rows/s")


if __name__ == "__main__":
    main()
