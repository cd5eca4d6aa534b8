"""Scale-out (CDC_SHARD=k/N): the shards split the outbox exactly, a publication serves only the
slot and shard `migrate` made it for, and one consumer is replaced by shards with every event
delivered once."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta

import psycopg
import pytest
from psycopg import sql

from cdc_consumer.shard import Shard, outbox_condition
from tests.support.fix_clickhouse import clickhouse_select
from tests.support.fix_consumer import current_wal_lsn, publish_probes, shards_holding

pytestmark = pytest.mark.e2e


def test_shards_split_the_outbox_exactly_and_evenly(pg_conn):
    """Of 30,000 random event ids every one is in exactly one of three shards, and each shard
    holds a third of them, give or take 4%."""
    conditions = [outbox_condition(Shard(index, 3)) for index in range(3)]
    shares = sql.SQL(", ").join(
        sql.SQL("count(*) FILTER (WHERE {})").format(condition) for condition in conditions
    )
    in_exactly_one = sql.SQL(" + ").join(
        sql.SQL("({})::int").format(condition) for condition in conditions
    )
    row = pg_conn.execute(
        sql.SQL(
            "SELECT {shares}, count(*) FILTER (WHERE {one} <> 1) FROM"
            " (SELECT gen_random_uuid() AS event_id FROM generate_series(1, 30000)) AS ids"
        ).format(shares=shares, one=in_exactly_one)
    ).fetchone()
    assert row is not None
    *per_shard, not_in_exactly_one = row
    assert not_in_exactly_one == 0
    assert sum(per_shard) == 30_000
    assert all(abs(share - 10_000) < 400 for share in per_shard), per_shard


def test_publication_serves_only_the_slot_and_shard_it_was_made_for(
    make_consumer, clickhouse_server, pg_conn
):
    """`run` refuses a publication made for another shard, or whose row filter was changed by
    hand, and `migrate` one made for another slot, naming what differs."""
    # GIVEN shard 0 of 2, migrated
    first = make_consumer(clickhouse_server.url, CDC_SHARD="0/2")
    first.migrate()
    publication = first.env["CDC_PUBLICATION"]
    [comment] = pg_conn.execute(
        "SELECT obj_description(oid, 'pg_publication') FROM pg_publication WHERE pubname = %s",
        (publication,),
    ).fetchone() or ("{}",)
    assert json.loads(comment)["cdc_shard"] == "0/2"
    # WHEN the same slot and publication are run as shard 1 of 2
    other_shard = first.cli("run", env={**first.env, "CDC_SHARD": "1/2"})
    # THEN it is refused, naming both shards
    assert other_shard.returncode == 2
    assert "made for shard 0/2, but CDC_SHARD says shard 1/2" in other_shard.stderr
    # WHEN another consumer (its own slot) is given the same publication
    second = make_consumer(clickhouse_server.url, CDC_SHARD="0/2", CDC_PUBLICATION=publication)
    shared = second.cli("migrate")
    assert shared.returncode == 2
    assert f"was made for slot {first.slot}, not {second.slot}" in shared.stderr
    # WHEN the row filter is changed by hand
    pg_conn.execute(
        f"ALTER PUBLICATION {publication} SET TABLE event_outbox WHERE (event_type = 'a')"
    )
    altered = first.cli("run")
    assert altered.returncode == 2
    assert "row filter was changed after migrate made it" in altered.stderr
    # AND migrate does not paper over it either
    assert first.cli("migrate").returncode == 2
    # WHEN the filter is put back as the hint says
    recorded = json.loads(comment)["row_filter"]
    assert f"WHERE ({recorded})" in altered.stderr
    pg_conn.execute(f"ALTER PUBLICATION {publication} SET TABLE event_outbox WHERE ({recorded})")
    # THEN the publication is accepted again
    assert first.cli("migrate").returncode == 0


def test_unsharded_publication_filtered_by_hand_is_refused(
    make_consumer, clickhouse_server, pg_conn
):
    """A publication made without a record (before records, or by hand) with a row filter would
    leave the filtered rows unshipped forever: `run` refuses it and points at CDC_SHARD."""
    consumer = make_consumer(clickhouse_server.url)
    publication = consumer.env["CDC_PUBLICATION"]
    pg_conn.execute(
        f"CREATE PUBLICATION {publication} FOR TABLE event_outbox WHERE (event_type = 'kept')"
        " WITH (publish = 'insert', publish_via_partition_root = true)"
    )
    result = consumer.cli("migrate")
    assert result.returncode == 2
    assert "which migrate did not set" in result.stderr
    assert "CDC_SHARD" in result.stderr


def _events_by_source(url: str, environment: str) -> tuple[dict[str, int], int, int]:
    rows = clickhouse_select(
        url,
        "SELECT source, count() FROM event_log"
        f" WHERE environment = '{environment}' GROUP BY source ORDER BY source",
    )
    [[total, distinct]] = clickhouse_select(
        url,
        f"SELECT count(), uniqExact(event_id) FROM event_log WHERE environment = '{environment}'",
    )
    return dict(rows), total, distinct


def _epoch(url: str, source: str) -> int:
    [[epoch]] = clickhouse_select(url, f"SELECT max(epoch) FROM cdc_runs WHERE source = '{source}'")
    return int(epoch)


def _event_ids(url: str, environment: str, source: str) -> list[str]:
    rows = clickhouse_select(
        url,
        "SELECT toString(event_id) FROM event_log"
        f" WHERE environment = '{environment}' AND source = '{source}'",
    )
    return [row[0] for row in rows]


def test_one_consumer_replaced_by_two_shards_delivers_every_event_once(
    make_database, make_consumer, merges_stopped
):
    """The documented switch from one consumer to two shards: stop it, drop its slot, backfill
    each shard from before its last shipped commit (--replaces it), start the shards. Events it
    shipped are not shipped again, the gap's are shipped once, each by its own shard, and
    verify finds each shard whole."""
    environment = f"shards-{uuid.uuid4().hex[:12]}"
    url = make_database()
    with psycopg.connect(url, autocommit=True) as conn:
        # GIVEN one consumer that shipped some events and stopped
        single = make_consumer(merges_stopped.url, database_url=url)
        single.migrate()
        single.start()
        shipped = publish_probes(conn, 300, environment)
        single.wait_confirmed(current_wal_lsn(conn))
        assert single.stop() == 0
        [last_shipped] = conn.execute(
            "SELECT last_commit_time FROM cdc_progress WHERE slot = %s", (single.slot,)
        ).fetchone() or (None,)
        assert last_shipped is not None
        # AND events committed while nothing streams
        gap = publish_probes(conn, 300, environment)
        shards = [
            make_consumer(merges_stopped.url, database_url=url, CDC_SHARD=f"{k}/2")
            for k in range(2)
        ]
        since = (last_shipped - timedelta(minutes=5)).isoformat()
        switch = ("backfill", "--since", since, "--replaces", single.slot)
        # WHEN a shard is backfilled while the consumer it replaces still has its slot
        refused = shards[0].cli(*switch)
        # THEN it is refused: that consumer could stream the same events again
        assert refused.returncode == 2
        assert f"its slot {single.slot} still exists" in refused.stderr
        # AND a source no consumer wrote as is refused
        unknown = shards[0].cli("backfill", "--since", since, "--replaces", "no_such_source")
        assert unknown.returncode == 2
        assert "no consumer has written as that source" in unknown.stderr
        # WHEN the slot is dropped and each shard is backfilled from well before the last
        # commit the consumer shipped
        conn.execute("SELECT pg_drop_replication_slot(%s)", (single.slot,))
        epoch = _epoch(merges_stopped.url, single.slot)
        for shard in shards:
            result = shard.cli(*switch)
            assert result.returncode == 0, result.stderr
            assert json.loads(result.stdout)["shipped"] > 0
        # THEN each backfill fenced the replaced consumer: an insert of its run would fail
        assert _epoch(merges_stopped.url, single.slot) == epoch + 2
        # AND the shards stream what comes after, across a restart of each
        for shard in shards:
            shard.start()
        later = publish_probes(conn, 300, environment)
        for shard in shards:
            shard.wait_confirmed(current_wal_lsn(conn))
            assert shard.stop() == 0
            shard.start()
        final = publish_probes(conn, 100, environment)
        for shard in shards:
            shard.wait_confirmed(current_wal_lsn(conn))
            assert shard.stop() == 0
    # THEN every event is in event_log exactly once (merges stopped: nothing folded away)
    published = len(shipped) + len(gap) + len(later) + len(final)
    per_source, total, distinct = _events_by_source(merges_stopped.url, environment)
    assert (total, distinct) == (published, published)
    # AND the single consumer's rows are its own, the rest split between the shards
    assert per_source[single.slot] == len(shipped)
    assert sum(per_source[shard.slot] for shard in shards) == published - len(shipped)
    assert all(per_source[shard.slot] > 0 for shard in shards)
    with psycopg.connect(url, autocommit=True) as conn:
        for shard in shards:
            ids = _event_ids(merges_stopped.url, environment, shard.slot)
            assert shards_holding(conn, ids, count=2) == {shard.env["CDC_SHARD"]}
    # AND each shard's verify is whole, having judged its own share of every event
    checked = []
    for shard in shards:
        result = shard.cli("verify", "--since", since, "--json")
        assert result.returncode == 0, result.stdout + result.stderr
        report = json.loads(result.stdout)
        assert report["whole"] is True
        checked.append(report["checked"])
    assert sum(checked) == published
    assert all(count > 0 for count in checked)
