"""Cancel and delete in the database alone (in-memory SQLite): a batch stored after the
cancel writes nothing, a cancelled run is never claimed, settled, resumed, requeued or
healed; a delete removes every row of its run and nothing of another, and refuses a run
still running."""

from __future__ import annotations

from datetime import timedelta

import pytest

from core.columns import batch_columns
from core.errors import RunCancelled, RunUnfinished
from db import batch_life, queries
from db.cancellation import cancel_run
from db.deletion import delete_run
from db.healing import waiting_batches
from db.models import metadata, utcnow
from producer.cancel import parse_age
from producer.submit import resume_run
from tests.support import rows_by_table, save_model

RUNS_KEEP = {"models"}  # a run's delete never touches these


def a_run(engine, model_id: int, n_batches: int) -> tuple[int, str]:
    with engine.begin() as conn:
        run_id, token = queries.create_run(conn, model_id, "/nowhere", "celery")
        for seq in range(n_batches):
            batch_life.record_batch(conn, run_id, seq, [f"3/{run_id}-{seq}.png"], 10)
    return run_id, token


def store(engine, run_id: int, seq: int) -> int:
    rows = batch_life.poison_rows([f"3/{run_id}-{seq}.png"], ["3"], 0)
    return batch_life.store_batch(engine, run_id, seq, batch_columns(rows), "failed", 1)


def test_a_batch_stored_after_the_cancel_writes_nothing(memory_engine, classifier):
    model_id = save_model(memory_engine, classifier)
    run_id, token = a_run(memory_engine, model_id, 4)
    assert store(memory_engine, run_id, 0) == 1  # before the cancel: kept
    done = cancel_run(memory_engine, run_id)
    assert (done.was, done.stopped) == ("running", (1, 2, 3))
    assert store(memory_engine, run_id, 1) == 0  # scored meanwhile: its claim is gone
    assert batch_life.was_cancelled(memory_engine, run_id, 1)
    # the producer's last word does not settle it done
    assert queries.finish_submission(memory_engine, run_id, 4, 0) == "cancelled"
    with memory_engine.connect() as conn:
        run = queries.get_run(conn, run_id)
    assert (run["status"], run["n_failed"], run["n_scored"]) == ("cancelled", 1, 0)
    assert run["finished_at"] is not None
    assert rows_by_table(memory_engine, run_id)["predictions"] == 1


def test_a_cancelled_run_is_never_claimed_resumed_requeued_or_healed(memory_engine, classifier):
    model_id = save_model(memory_engine, classifier)
    run_id, token = a_run(memory_engine, model_id, 2)
    store(memory_engine, run_id, 0)  # failed: --retry-failed would requeue it
    cancel_run(memory_engine, run_id)
    with memory_engine.begin() as conn:  # a live sender records one more after the cancel
        batch_life.record_batch(conn, run_id, 2, ["3/late.png"], 10)
    for seq in (1, 2):
        assert batch_life.claim_batch(memory_engine, run_id, seq, token).action == "cancelled"
    assert queries.requeue_failed_batches(memory_engine, run_id) == 0
    with memory_engine.connect() as conn:
        assert waiting_batches(conn, utcnow() + timedelta(hours=1), [run_id]) == []
    with pytest.raises(RunCancelled, match=r"was cancelled: .*`producer submit /nowhere`"):
        resume_run(memory_engine, run_id, sender=None)  # type: ignore[arg-type]
    assert cancel_run(memory_engine, run_id).stopped == (2,)  # cancelled again: the late one


def test_delete_removes_every_row_of_its_run_and_nothing_else(memory_engine, classifier):
    model_id = save_model(memory_engine, classifier)
    keep, _ = a_run(memory_engine, model_id, 2)
    gone, _ = a_run(memory_engine, model_id, 3)
    for run_id, n in ((keep, 2), (gone, 3)):
        for seq in range(n):
            store(memory_engine, run_id, seq)
        assert queries.finish_submission(memory_engine, run_id, n, 0) == "done"
    before = rows_by_table(memory_engine, keep)
    assert rows_by_table(memory_engine, gone)["batch_failures"] == 3
    deleted = delete_run(memory_engine, gone)
    assert (deleted.rows, deleted.batches) == (3, 3)
    assert set(rows_by_table(memory_engine, gone).values()) == {0}
    assert rows_by_table(memory_engine, keep) == before
    with memory_engine.connect() as conn:
        assert queries.get_run(conn, keep)["status"] == "done"
        assert conn.exec_driver_sql("SELECT COUNT(*) FROM models").scalar_one() == 1
    # every table keyed by a run is one the delete empties (checked above, through them all)
    keyed = {t.name for t in metadata.sorted_tables if "run_id" in t.c}
    assert keyed <= set(before) and not keyed & RUNS_KEEP


def test_delete_refuses_a_run_still_running_until_it_is_cancelled(memory_engine, classifier):
    model_id = save_model(memory_engine, classifier)
    run_id, _ = a_run(memory_engine, model_id, 2)
    store(memory_engine, run_id, 0)
    with pytest.raises(RunUnfinished, match=rf"is running: .*`producer cancel {run_id}`"):
        delete_run(memory_engine, run_id)
    assert rows_by_table(memory_engine, run_id)["predictions"] == 1
    cancel_run(memory_engine, run_id)
    assert delete_run(memory_engine, run_id).rows == 1


@pytest.mark.parametrize(("text", "seconds"), [
    ("30d", 30 * 86400), ("12h", 43200), ("90m", 5400), ("2w", 14 * 86400), ("45s", 45),
    ("7", 7 * 86400), ("1.5h", 5400),
])
def test_ages_read_as_a_number_and_a_unit(text, seconds):
    assert parse_age(text).total_seconds() == seconds


def test_an_age_without_a_number_says_how_to_write_one():
    with pytest.raises(ValueError, match="e.g. 30d"):
        parse_age("last month")
