"""Several writers storing batches of one run at once, on the real PostgreSQL: a writer never
waits for another writer of the run (each batch's counts are rows of its own), and two
deliveries of one batch at once store it once: the second waits for the first's commit on
that batch's row alone, then finds it stored."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import create_engine, text

from bench.run_writers import batch_rows
from core.columns import batch_columns
from db.batch_life import record_batch, store_batch, write_batch
from db.queries import create_run, finish_submission
from db.session import get_engine, normalize_url
from tests.support import save_model

pytestmark = pytest.mark.integration
SIZE = 50


@pytest.fixture
def run_of_two_batches(postgres_url, classifier) -> int:
    engine = get_engine(postgres_url)
    model_id = save_model(engine, classifier)
    with engine.begin() as conn:
        run_id, _token = create_run(conn, model_id, "/images", "celery")
        for seq in (0, 1):
            record_batch(conn, run_id, seq, [r["path"] for r in batch_rows(seq, SIZE)], 0)
    return run_id


def impatient_engine(url: str):
    """An engine whose statements give up after waiting 3 s for a lock."""
    return create_engine(
        normalize_url(url), connect_args={"options": "-c lock_timeout=3000"}
    )


def stored(url: str, run_id: int) -> tuple[int, int, str]:
    """The run's scored images summed over its batches, its rows, and its status."""
    with get_engine(url).connect() as conn:
        return tuple(conn.execute(  # type: ignore[return-value]
            text("SELECT n_scored, (SELECT COUNT(*) FROM predictions WHERE run_id = :r), "
                 "(SELECT status FROM runs WHERE id = :r) FROM run_totals WHERE run_id = :r"),
            {"r": run_id}).one())


def test_a_writer_mid_batch_does_not_hold_up_another_writer_of_the_run(
    postgres_url, run_of_two_batches
):
    run_id = run_of_two_batches
    finish_submission(get_engine(postgres_url), run_id, 2 * SIZE, 0)  # either may be last
    first = get_engine(postgres_url).connect()
    try:
        with first.begin():
            # the first writer has written its batch's rows and counts, not yet committed
            assert write_batch(first, run_id, 0, batch_columns(batch_rows(0, SIZE))) is not None
            second = impatient_engine(postgres_url)
            try:
                assert store_batch(second, run_id, 1, batch_columns(batch_rows(1, SIZE))) == SIZE
            finally:
                second.dispose()
            assert stored(postgres_url, run_id) == (SIZE, SIZE, "running")
    finally:
        first.close()
    assert stored(postgres_url, run_id) == (2 * SIZE, 2 * SIZE, "running")
    assert store_batch(get_engine(postgres_url), run_id, 0, batch_columns(batch_rows(0, SIZE))) == 0
    assert stored(postgres_url, run_id) == (2 * SIZE, 2 * SIZE, "done")  # settled by a retry


def test_two_deliveries_of_a_batch_at_once_store_it_once(postgres_url, run_of_two_batches):
    run_id = run_of_two_batches
    engine = get_engine(postgres_url)
    results: list[int] = []
    started = threading.Event()

    def second_delivery() -> None:
        started.set()
        results.append(store_batch(engine, run_id, 0, batch_columns(batch_rows(0, SIZE))))

    with engine.connect() as first, first.begin():
        written = write_batch(first, run_id, 0, batch_columns(batch_rows(0, SIZE)))
        assert written == (SIZE, "queued", None)
        thread = threading.Thread(target=second_delivery)
        thread.start()
        started.wait()
        thread.join(1.0)
        assert thread.is_alive()  # waiting on the batch's row for the first to commit
    thread.join(30)
    assert results == [0]
    assert stored(postgres_url, run_id) == (SIZE, SIZE, "running")  # settled by the second


def test_the_producer_finishing_while_the_last_batch_is_written_leaves_the_run_done(
    postgres_url, run_of_two_batches, monkeypatch
):
    """The producer fixes the run's size and settles it after the last batch's writer read
    the run (no size yet) and before that writer commits: its settling cannot see the batch
    stored, so the writer must settle the run after its commit."""
    from db import batch_life

    run_id = run_of_two_batches
    engine = get_engine(postgres_url)
    assert store_batch(engine, run_id, 0, batch_columns(batch_rows(0, SIZE))) == SIZE
    write_rows = batch_life.write_predictions

    def producer_finishes_first(*args, **kwargs):
        # on another connection: the writer's transaction is open, its batch not committed
        assert finish_submission(engine, run_id, 2 * SIZE, 0) == "running"
        return write_rows(*args, **kwargs)

    monkeypatch.setattr(batch_life, "write_predictions", producer_finishes_first)
    assert store_batch(engine, run_id, 1, batch_columns(batch_rows(1, SIZE))) == SIZE
    assert stored(postgres_url, run_id) == (2 * SIZE, 2 * SIZE, "done")
