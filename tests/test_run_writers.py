"""Several writers storing batches of one run at once, on the real PostgreSQL: a writer waits
for another only to update the run's counts, never for the length of its batch, and two
deliveries of one batch at once still count each image once."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import create_engine, select, text

from bench.run_writers import batch_rows
from db.batch_life import record_batch, store_batch
from db.bulk import insert_new_rows
from db.models import runs, utcnow
from db.queries import RUN_COUNTS, RowCounts, add_to_run, create_run
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


def run_counts(url: str, run_id: int) -> tuple[int, int]:
    with get_engine(url).connect() as conn:
        return tuple(conn.execute(  # type: ignore[return-value]
            text("SELECT n_scored, (SELECT COUNT(*) FROM predictions WHERE run_id = :r) "
                 "FROM runs WHERE id = :r"), {"r": run_id}).one())


def test_a_writer_mid_batch_does_not_hold_up_another_writer_of_the_run(
    postgres_url, run_of_two_batches
):
    run_id = run_of_two_batches
    first = get_engine(postgres_url).connect()
    try:
        with first.begin():
            # the first writer has inserted its rows (each insert's foreign-key check holds
            # a key-share lock on the run's row) and not yet committed
            insert_new_rows(first, run_id, 0, batch_rows(0, SIZE), utcnow())
            second = impatient_engine(postgres_url)
            try:
                assert store_batch(second, run_id, 1, batch_rows(1, SIZE)) == SIZE
            finally:
                second.dispose()
            assert run_counts(postgres_url, run_id) == (SIZE, SIZE)
    finally:
        first.close()


def test_two_deliveries_of_a_batch_at_once_count_each_image_once(
    postgres_url, run_of_two_batches
):
    run_id = run_of_two_batches
    engine = get_engine(postgres_url)
    stored: list[int] = []
    started = threading.Event()

    def second_delivery() -> None:
        started.set()
        stored.append(store_batch(engine, run_id, 0, batch_rows(0, SIZE)))

    with engine.connect() as first, first.begin():
        assert len(insert_new_rows(first, run_id, 0, batch_rows(0, SIZE), utcnow())) == SIZE
        thread = threading.Thread(target=second_delivery)
        thread.start()
        started.wait()
        thread.join(1.0)
        assert thread.is_alive()  # waiting on the unique index for the first to commit
        store_batch_tail(first, run_id, SIZE)
    thread.join(30)
    assert stored == [0]
    assert run_counts(postgres_url, run_id) == (SIZE, SIZE)


def store_batch_tail(conn, run_id: int, n_new: int) -> None:
    """What store_batch does after its insert: count the new rows into the run."""
    run = conn.execute(
        select(*RUN_COUNTS).where(runs.c.id == run_id).with_for_update(key_share=True)
    ).one()
    add_to_run(conn, run_id, run, RowCounts(scored=n_new, labelled=n_new))
