"""The fates of a batch the time limit stopped, in the database (SQLite in memory): split,
an archive batch keeps its part of the archive's record in each half; requeued whole by
``resume --retry-failed``, its delivery counts start again, the time limit's too, so its next
delivery scores it whole rather than splitting it for a cause that is gone."""

from __future__ import annotations

from db import batch_life, queries
from db.splits import split_batch
from tests.support import save_model


def test_a_failed_batch_requeued_whole_is_scored_whole_not_split(memory_engine, classifier):
    engine = memory_engine
    model_id = save_model(engine, classifier)
    with engine.begin() as conn:
        run_id, token = queries.create_run(conn, model_id, "/data", "celery")
        batch_life.record_batch(conn, run_id, 0, ["3/a.png", "7/b.png"], 0)
    # killed once by the time limit: split; and the worker process died twice: poison
    batch_life.count_failed_delivery(engine, run_id, 0, token, "time limit", time_limited=True)
    assert batch_life.claim_batch(engine, run_id, 0, token).action == "split"
    for _ in range(2):
        batch_life.count_failed_delivery(engine, run_id, 0, token, "the process died")
    claim = batch_life.claim_batch(engine, run_id, 0, token)
    assert claim.action == "poison" and claim.batch is not None and claim.batch.time_limited == 1
    batch_life.give_up(engine, claim)

    assert queries.requeue_failed_batches(engine, run_id) == 1
    claim = batch_life.claim_batch(engine, run_id, 0, token)
    assert claim.action == "score" and claim.batch is not None
    assert (claim.batch.failed_deliveries, claim.batch.time_limited) == (0, 0)


def test_the_halves_of_an_archive_batch_keep_their_members_places_and_labels(
    memory_engine, classifier
):
    engine = memory_engine
    model_id = save_model(engine, classifier)
    paths = [f"d.tar/{i}.png" for i in range(5)]
    record = {"archive": "d.tar", "format": "tar", "size": 10_240,
              "members": [[512 * (2 * i + 1), 70] for i in range(5)],
              "labels": ["3", "7", "3", "7", "3"]}
    with engine.begin() as conn:
        run_id, token = queries.create_run(conn, model_id, "/data", "celery")
        batch_life.record_batch(conn, run_id, 0, paths, 0, record)
    assert split_batch(engine, run_id, 0) == [(1, paths[:2]), (2, paths[2:])]
    for seq, part in ((1, slice(0, 2)), (2, slice(2, None))):
        claim = batch_life.claim_batch(engine, run_id, seq, token)
        assert claim.batch is not None and claim.batch.paths == paths[part]
        assert claim.batch.members == {**record, "members": record["members"][part],
                                       "labels": record["labels"][part]}
