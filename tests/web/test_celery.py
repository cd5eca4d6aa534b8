"""web.celery: Beat's schedule as declared, and both tasks run by a real worker on Redis."""

from __future__ import annotations

from datetime import timedelta

import pytest
from celery.beat import Scheduler
from celery.schedules import schedule

from tests.support.fix_consumer import current_wal_lsn, publish_probes


def test_beat_schedule_runs_prune_hourly_and_the_slot_check_every_minute(celery_app):
    """Beat loads both entries with the default intervals, and both tasks are registered."""
    # What a worker or Beat does at start: import the task modules autodiscovery names.
    celery_app.loader.import_default_modules()
    scheduler = Scheduler(app=celery_app, lazy=True)
    scheduler.setup_schedule()
    every = {}
    for name in ("outbox-prune", "outbox-slot-check"):
        entry = scheduler.schedule[name]
        assert isinstance(entry.schedule, schedule)
        assert entry.task in celery_app.tasks
        assert entry.options == {"expires": entry.schedule.seconds}
        every[name] = timedelta(seconds=entry.schedule.seconds)
    assert every == {"outbox-prune": timedelta(hours=1), "outbox-slot-check": timedelta(minutes=1)}


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_worker_runs_both_tasks_against_postgres(
    celery_worker, make_consumer, clickhouse_server, pg_conn, settings
):
    """Sent through Redis, the slot check reports the real slot and the prune task deletes
    rows the consumer has shipped (retention 0) and nothing else."""
    from web.outbox.tasks import outbox_prune_task, outbox_slot_check_task

    # GIVEN rows shipped by a consumer that is now stopped, and one published since
    consumer = make_consumer(clickhouse_server.url)
    consumer.migrate()
    settings.CDC_SLOT = consumer.slot
    settings.OUTBOX_RETENTION = timedelta(0)
    settings.OUTBOX_PRUNE_COMMIT_MARGIN = timedelta(0)
    consumer.start()
    shipped = publish_probes(pg_conn, 5, "celery-shipped")
    consumer.wait_confirmed(current_wal_lsn(pg_conn))
    assert consumer.stop() == 0
    unshipped = publish_probes(pg_conn, 3, "celery-unshipped")
    # WHEN the worker runs the two tasks
    report = outbox_slot_check_task.delay().get(timeout=60)
    pruned = outbox_prune_task.delay().get(timeout=60)
    # THEN the report is the stopped slot's, and only shipped rows were pruned
    [slot] = report["slots"]
    assert slot["slot"] == consumer.slot
    assert slot["active"] is False
    assert slot["lag_bytes"] > 0
    assert report["severity"] == slot["severity"] == "warning"
    assert pruned["deleted"] >= 5
    left = pg_conn.execute(
        "SELECT event_id::text FROM event_outbox WHERE event_id::text = ANY(%s)",
        (shipped + unshipped,),
    ).fetchall()
    assert sorted(row[0] for row in left) == sorted(unshipped)
