"""Writers of one run side by side (db/batch_life.store_batch writes each batch's counts on
rows of its own): four processes store batches of one run at once, some batches twice (a
redelivery racing the first delivery), on SQLite and PostgreSQL; every path has one row, each
batch is stored by one delivery, and the run's counts, read in one snapshot while the writers
commit and at the end, are what SQL recomputes from its rows."""

from __future__ import annotations

import multiprocessing
import time
from typing import Any

import pytest
from sqlalchemy import text

from core.columns import PredictionRow, batch_columns
from db import batch_life, queries
from db.session import dispose_engines, get_engine
from tests.support import RECOMPUTE, save_model

BATCHES, ROWS = 16, 300


def batch_rows(seq: int) -> list[PredictionRow]:
    """Rows of batch ``seq``: labelled 3 or 7, right or wrong by turns, a few errors."""
    rows = []
    for i in range(ROWS):
        label = "3" if i % 2 else "7"
        if i % 50 == 0:
            rows.append(PredictionRow(path=f"{label}/{seq}-{i}.png", label=label, pred_l1=None,
                                      pred_l2=None, pred_sgd=None, dist_l1=None, dist_l2=None,
                                      prob_sgd=None, error="not an image Pillow can read"))
            continue
        wrong = "7" if label == "3" else "3"
        rows.append(PredictionRow(
            path=f"{label}/{seq}-{i}.png", label=label, pred_l1=label if i % 3 else wrong,
            pred_l2=label if i % 5 else wrong, pred_sgd=label if i % 7 else wrong,
            dist_l1=1.0, dist_l2=0.5, prob_sgd=0.9, error=None))
    return rows


def store(url: str, run_id: int, seqs: list[int], start: Any) -> None:
    dispose_engines()  # the parent's connections stay the parent's
    engine = get_engine(url)
    start.wait(30)
    for seq in seqs:
        batch_life.store_batch(engine, run_id, seq, batch_columns(batch_rows(seq)), deliveries=1)


@pytest.mark.integration
def test_concurrent_writers_of_one_run_keep_exact_counts(any_db_url, classifier):
    engine = get_engine(any_db_url)
    model_id = save_model(engine, classifier)
    with engine.begin() as conn:
        run_id, _ = queries.create_run(conn, model_id, "/images", "celery")
        for seq in range(BATCHES):
            batch_life.record_batch(conn, run_id, seq, [], 0)
    queries.finish_submission(engine, run_id, BATCHES * ROWS, 0)
    dispose_engines()
    context = multiprocessing.get_context("fork")
    start = context.Event()
    # each writer takes every fourth batch, and the first half of the batches is also
    # stored by the next writer: sixteen batches, twenty-four deliveries
    shares = [[s for s in range(BATCHES)
               if s % 4 == w or (s < BATCHES // 2 and s % 4 == (w - 1) % 4)]
              for w in range(4)]
    procs = [context.Process(target=store, args=(any_db_url, run_id, share, start))
             for share in shares]
    for p in procs:
        p.start()
    start.set()
    engine = get_engine(any_db_url)
    seen = set()
    while any(p.is_alive() for p in procs):
        seen.add(assert_totals_are_the_rows(engine, run_id))
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    assert len(seen) > 1  # the sums were checked between commits, not only before and after
    assert assert_totals_are_the_rows(engine, run_id) == BATCHES * ROWS
    with engine.connect() as conn:
        run = queries.get_run(conn, run_id)
        sql = conn.execute(text(RECOMPUTE), {"run": run_id}).mappings().one()
        n, distinct = conn.execute(text(
            "SELECT COUNT(*), COUNT(DISTINCT path) FROM predictions WHERE run_id = :r"),
            {"r": run_id}).one()
        deliveries = conn.execute(text(
            "SELECT SUM(deliveries) FROM batches WHERE run_id = :r"), {"r": run_id}).scalar()
    assert (n, distinct) == (BATCHES * ROWS, BATCHES * ROWS)
    assert deliveries == BATCHES  # of 24 deliveries, the one that stored each batch
    assert run["status"] == "done"
    for column in ("n_scored", "n_failed", "n_labelled", "n_correct_l1", "n_correct_l2",
                   "n_correct_sgd"):
        assert run[column] == sql[column], column
    assert run["n_failed"] == BATCHES * 6


def assert_totals_are_the_rows(engine: Any, run_id: int) -> int:
    """In one snapshot: the run's counts summed over its batches (``run_totals``) and its
    confusion counts (``run_counts``) against SQL over its rows; returns the rows seen."""
    with engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"))
        totals = conn.execute(text("SELECT * FROM run_totals WHERE run_id = :r"),
                              {"r": run_id}).mappings().one()
        sql = conn.execute(text(RECOMPUTE), {"run": run_id}).mappings().one()
        cells = "SELECT predictor, label, predicted, n FROM {} WHERE run_id = :r"
        kept = set(conn.execute(text(cells.format("run_counts")), {"r": run_id}).all())
        grouped = set(conn.execute(text(cells.format("run_confusion")), {"r": run_id}).all())
    for column in ("n_scored", "n_failed", "n_labelled", "n_correct_l1", "n_correct_l2",
                   "n_correct_sgd"):
        assert totals[column] == sql[column], column
    assert {(p, la, pr, int(n)) for p, la, pr, n in kept} == {
        (p, la, pr, int(n)) for p, la, pr, n in grouped}
    return int(sql["n_scored"]) + int(sql["n_failed"])


def test_a_sqlite_read_in_progress_does_not_hold_up_a_writer(sqlite_url, classifier):
    """A report or ``--wait`` poll reading in a transaction takes no write lock (a deferred
    transaction), so a worker storing a batch meanwhile does not wait for it."""
    engine = get_engine(sqlite_url)
    model_id = save_model(engine, classifier)
    with engine.begin() as conn:
        run_id, _ = queries.create_run(conn, model_id, "/images", "celery")
        batch_life.record_batch(conn, run_id, 0, [], 0)
    reader = get_engine(sqlite_url).connect()
    try:
        assert queries.progress(reader, run_id).done == 0  # its transaction stays open
        start = time.monotonic()
        assert batch_life.store_batch(engine, run_id, 0, batch_columns(batch_rows(0))) == ROWS
        assert time.monotonic() - start < 5  # the busy timeout is 30 s
        assert queries.progress(reader, run_id).done == 0  # its snapshot, as first read
    finally:
        reader.close()
