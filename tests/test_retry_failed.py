"""``resume --retry-failed`` requeues a failed batch whole: its delivery counts start again,
the time limit's too, so its next delivery scores it whole rather than splitting it for a
cause that is gone (on SQLite in memory)."""

from __future__ import annotations

from db import batch_life, queries
from tests.support import save_model
from worker.splitting import should_split


def test_a_failed_batch_requeued_whole_is_scored_whole_not_split(memory_engine, classifier):
    engine = memory_engine
    model_id = save_model(engine, classifier)
    with engine.begin() as conn:
        run_id, token = queries.create_run(conn, model_id, "/data", "celery")
        batch_life.record_batch(conn, run_id, 0, ["3/a.png", "7/b.png"], 0)
    # killed once by the time limit, and the worker process died twice: poison, not split
    batch_life.count_failed_delivery(engine, run_id, 0, token, "time limit", time_limited=True)
    for _ in range(2):
        batch_life.count_failed_delivery(engine, run_id, 0, token, "the process died")
    claim = batch_life.claim_batch(engine, run_id, 0, token)
    assert claim.action == "poison" and claim.batch is not None and claim.batch.time_limited == 1
    batch_life.give_up(engine, claim)

    assert queries.requeue_failed_batches(engine, run_id) == 1
    claim = batch_life.claim_batch(engine, run_id, 0, token)
    assert claim.action == "score" and claim.batch is not None
    assert (claim.batch.failed_deliveries, claim.batch.time_limited) == (0, 0)
    assert not should_split(claim.batch)
