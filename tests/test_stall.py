"""A run that stores nothing for longer than DIGITSCORE_STALL_HINT_AFTER while batches of it
wait shows as stalled in `status` and `runs`, with what to run."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import update

from core.columns import batch_columns
from db import batch_life, queries
from db.models import runs, utcnow
from db.session import get_engine


def test_a_run_waiting_past_the_stall_hint_time_is_called_stalled(run_cli, model_db):
    engine = get_engine(model_db)
    with engine.begin() as conn:
        run_id, _token = queries.create_run(conn, 1, "/data", "celery")
        batch_life.record_batch(conn, run_id, 0, ["3/a.png"], 10)
        batch_life.record_batch(conn, run_id, 1, ["3/b.png"], 10)
    env = {"DIGITSCORE_STALL_HINT_AFTER": "60"}
    r = run_cli("status", str(run_id), "--database-url", model_db, env=env)
    assert r.exit_code == 0 and "stalled" not in r.output  # just created
    with engine.begin() as conn:
        conn.execute(update(runs).where(runs.c.id == run_id).values(
            created_at=utcnow() - timedelta(seconds=90)))
    r = run_cli("status", str(run_id), "--database-url", model_db, env=env)
    assert "stalled: no batch stored for 90 s while 2 wait" in r.output, r.output
    assert f"`producer heal {run_id}` re-sends lost ones" in r.output, r.output
    assert f"producer resume {run_id}" in r.output and "producer workers" in r.output
    r = run_cli("runs", "--database-url", model_db, env=env)
    assert f"run {run_id} stalled: no batch stored for 90 s" in r.output, r.output
    with engine.connect() as conn:
        assert queries.stall(conn, queries.get_run(conn, run_id)).queued_batches == 2
    # a batch stored just now: not stalled any more
    batch_life.store_batch(engine, run_id, 0, batch_columns([]))
    r = run_cli("status", str(run_id), "--database-url", model_db, env=env)
    assert "stalled" not in r.output, r.output
