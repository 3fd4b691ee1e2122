"""``predictions`` on PostgreSQL is partitioned by run (migration 0018): a run's rows are
its own table, with no unique index while the run is written and one built when it is
finished; deleting a run drops its table; an existing database's rows move into their
runs' tables."""

from __future__ import annotations

import logging

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, text

from core.columns import batch_columns, unscored_row
from db import batch_life, deletion, queries
from db.session import MIGRATIONS, get_engine
from tests.support import add_model, new_run

CLASSES = ["3"]

pytestmark = pytest.mark.integration


def indexes(engine: Engine, table: str) -> dict[str, bool]:
    """The indexes of ``table``: name and whether it is unique."""
    with engine.connect() as conn:
        return dict(conn.execute(text(
            "SELECT c.relname, i.indisunique FROM pg_index i JOIN pg_class c "
            "ON c.oid = i.indexrelid WHERE i.indrelid = CAST(:t AS regclass)"),
            {"t": table}).all())


def partition_of_rows(engine: Engine, run_id: int) -> set[str]:
    """The tables holding the run's rows, as PostgreSQL routes them."""
    with engine.connect() as conn:
        return set(conn.execute(text(
            "SELECT DISTINCT CAST(tableoid AS regclass) FROM predictions WHERE run_id = :r"),
            {"r": run_id}).scalars())


def store(engine: Engine, run_id: int, seq: int, paths: list[str]) -> None:
    with engine.begin() as conn:
        batch_life.record_batch(conn, run_id, seq, paths, 0)
    rows = [unscored_row(p, "3") for p in paths]
    assert batch_life.store_batch(engine, run_id, seq, batch_columns(rows), "failed") == len(paths)


def test_a_runs_rows_are_its_own_table_indexed_when_it_is_finished(postgres_url):
    engine = get_engine(postgres_url)
    model_id = add_model(engine, CLASSES)
    run_id, other = new_run(engine, model_id), new_run(engine, model_id)
    table = f"predictions_run_{run_id}"
    store(engine, run_id, 0, ["3/a.png", "3/b.png"])
    store(engine, other, 0, ["3/a.png"])
    assert partition_of_rows(engine, run_id) == {table}
    assert partition_of_rows(engine, other) == {f"predictions_run_{other}"}
    # while written: only the partial index of failed rows, no unique one
    assert list(indexes(engine, table).values()) == [False]
    store(engine, run_id, 1, ["3/c.png"])
    assert queries.finish_submission(engine, run_id, 3, 0) == "done"
    assert indexes(engine, table)[f"{table}_path"] is True
    assert f"predictions_run_{other}_path" not in indexes(engine, f"predictions_run_{other}")
    with engine.begin() as conn:  # built once: a second settling finds it
        queries.index_run_rows(conn, run_id)
    assert sum(indexes(engine, table).values()) == 1
    with engine.begin() as conn, pytest.raises(Exception, match="uq|unique|duplicate"):
        conn.execute(text(
            "INSERT INTO predictions (run_id, batch_seq, path, scored_at) "
            "VALUES (:r, 1, '3/a.png', now())"), {"r": run_id})


def test_a_finished_run_holding_a_path_twice_is_done_without_its_index(postgres_url, caplog):
    """Rows written by hand with a path twice cannot have the unique index: the run is
    still settled, and the log names why it has none."""
    engine = get_engine(postgres_url)
    run_id = new_run(engine, add_model(engine, CLASSES))
    store(engine, run_id, 0, ["3/a.png"])
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO predictions (run_id, batch_seq, path, scored_at) "
            "VALUES (:r, 0, '3/a.png', now())"), {"r": run_id})
    with caplog.at_level(logging.ERROR, logger="db.queries"):
        assert queries.finish_submission(engine, run_id, 1, 0) == "done"
    assert f"run {run_id} holds a path twice" in caplog.text
    assert f"predictions_run_{run_id}_path" not in indexes(engine, f"predictions_run_{run_id}")


def test_deleting_a_run_drops_its_table(postgres_url):
    engine = get_engine(postgres_url)
    model_id = add_model(engine, CLASSES)
    run_id, kept = new_run(engine, model_id), new_run(engine, model_id)
    for r in (run_id, kept):
        store(engine, r, 0, ["3/a.png", "3/b.png"])
        assert queries.finish_submission(engine, r, 2, 0) == "done"
    assert deletion.delete_run(engine, run_id).rows == 2
    with engine.connect() as conn:
        tables = set(conn.execute(text(
            "SELECT tablename FROM pg_tables WHERE tablename LIKE 'predictions_run_%'"
        )).scalars())
        assert tables == {f"predictions_run_{kept}"}
        assert conn.execute(text("SELECT COUNT(*) FROM predictions")).scalar_one() == 2


def test_migration_0018_moves_existing_rows_into_their_runs_tables(postgres_url):
    engine = get_engine(postgres_url)
    model_id = add_model(engine, CLASSES)
    run_ids = [new_run(engine, model_id) for _ in range(2)]
    for r in run_ids:
        store(engine, r, 0, [f"3/{r}-{i}.png" for i in range(3)])
    confusion = "SELECT * FROM run_confusion ORDER BY run_id, predictor, label, predicted"
    with engine.connect() as conn:
        before = conn.execute(text(confusion)).all()
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0017")
    with engine.connect() as conn:
        kind = conn.execute(text(
            "SELECT relkind FROM pg_class WHERE relname = 'predictions'")).scalar_one()
        assert kind == "r"  # one plain table again, with its unique constraint
        assert conn.execute(text("SELECT COUNT(*) FROM predictions")).scalar_one() == 6
    assert indexes(engine, "predictions")["uq_predictions_run_path"] is True
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
    for r in run_ids:
        table = f"predictions_run_{r}"
        assert partition_of_rows(engine, r) == {table}
        assert indexes(engine, table)[f"{table}_path"] is True
    with engine.connect() as conn:  # the views over it are back
        assert conn.execute(text(confusion)).all() == before
