"""Scale-out past one slot: consumer k of N streams only its share of the outbox (CDC_SHARD=k/N).

Each shard has its own slot, its own publication with a row filter, and its own source name in
event_log. The filter is one expression over the event id, so the N shards partition the outbox
by construction: every event is in exactly one of them, whatever its type or size. A free-form
filter per consumer could overlap (events doubled) or leave a gap (events lost), and nothing
could tell; `k/N` cannot.

`uuid_hash` is the hash PostgreSQL's hash indexes use: built in and immutable, which a row filter
requires (a cast to text is not allowed there). Clearing the sign bit before the modulo keeps
the N residues equally likely.

The same condition selects a shard's rows wherever the outbox is read for it: the publication
(PostgreSQL decodes every row and sends only those that match), the backfill and verify.

The publication records what `migrate` made it for in its comment (the slot, the shard, the row
filter as PostgreSQL printed it), and every command checks the publication against that and the
environment: a shard count changed, two shards given one publication, or a filter altered by
hand would otherwise move events between consumers silently, and at the boundary lose or double
some.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from psycopg import sql

_SPEC = re.compile(r"^(\d{1,3})/(\d{1,3})$")
SHARDS_MAX = 64  # each walsender decodes all the WAL: past a few, PostgreSQL pays (docs)


@dataclass(frozen=True, slots=True)
class Shard:
    index: int
    count: int

    @classmethod
    def parse(cls, spec: str) -> Shard:
        """`k/N`, 0 <= k < N, 2 <= N <= SHARDS_MAX."""
        match = _SPEC.match(spec.strip())
        if match is None:
            raise ValueError("must be k/N, e.g. 0/2 for the first of two consumers")
        index, count = int(match[1]), int(match[2])
        if not 2 <= count <= SHARDS_MAX:
            raise ValueError(f"N must be between 2 and {SHARDS_MAX} (one consumer: leave it unset)")
        if index >= count:
            raise ValueError(f"k must be below N: shards are numbered 0 to {count - 1}")
        return cls(index, count)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def condition(self) -> sql.Composed:
        """The boolean expression that holds for this shard's outbox rows."""
        # mod(), not %: the expression goes into statements with parameters and without.
        return sql.SQL("mod(uuid_hash(event_id) & 2147483647, {}) = {}").format(
            sql.Literal(self.count), sql.Literal(self.index)
        )


def outbox_condition(shard: Shard | None) -> sql.Composable:
    """What selects a consumer's rows from the outbox: its shard's, or all of them."""
    return sql.SQL("true") if shard is None else shard.condition


@dataclass(frozen=True, slots=True)
class PublicationRecord:
    """What `migrate` made a publication for, kept as the publication's comment."""

    slot: str
    shard: str | None  # Shard's `k/N`, or None: the whole outbox
    row_filter: str | None  # as pg_publication_tables printed it after creation

    def comment(self) -> str:
        return json.dumps(
            {"cdc_slot": self.slot, "cdc_shard": self.shard, "row_filter": self.row_filter},
            sort_keys=True,
        )

    @classmethod
    def from_comment(cls, comment: str | None) -> PublicationRecord | None:
        """The record, or None for a comment this project did not write (or none)."""
        try:
            fields: Any = json.loads(comment or "")
        except ValueError:
            return None
        if not isinstance(fields, dict) or "cdc_slot" not in fields:
            return None
        return cls(fields["cdc_slot"], fields.get("cdc_shard"), fields.get("row_filter"))
