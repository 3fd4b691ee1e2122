"""The schema is a public interface: migrations, models and docs must agree."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text

from db.models import metadata
from db.session import get_engine

DOCS = Path(__file__).resolve().parent.parent / "docs" / "schema.md"


def test_migrations_build_exactly_the_models_schema(any_db_url):
    engine = get_engine(any_db_url)  # first use: alembic upgrade head
    postgres = engine.dialect.name == "postgresql"

    def compared(obj, name, kind, _reflected, _other) -> bool:
        # on PostgreSQL the unique (run_id, path) index is each run's partition's, built when
        # the run is finished (tests/test_partitions.py), and the partitions are no models
        if postgres and kind == "unique_constraint" and name == "uq_predictions_run_path":
            return False
        return not (postgres and kind == "table" and str(name).startswith("predictions_run_"))

    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"include_object": compared})
        diff = compare_metadata(context, metadata)
    assert diff == []


def test_schema_upgrade_is_idempotent(any_db_url):
    from db.session import dispose_engines, upgrade_schema

    engine = get_engine(any_db_url)
    upgrade_schema(engine)  # a second process starting later does the same
    dispose_engines()
    tables = set(inspect(get_engine(any_db_url)).get_table_names())
    assert {"models", "runs", "batches", "predictions", "alembic_version"} <= tables


def test_every_column_is_documented():
    doc = DOCS.read_text()
    for table in metadata.sorted_tables:
        section = re.search(rf"## `{table.name}`.*?(?=\n## |\Z)", doc, re.S)
        assert section, f"docs/schema.md has no section for {table.name}"
        for column in table.columns:
            assert f"`{column.name}`" in section.group(0), f"{table.name}.{column.name}"


def test_database_password_never_printed(run_cli, tmp_path):
    url = "postgresql://digits:hunter2-secret@127.0.0.1:1/nothing"
    r = run_cli("runs", "--database-url", url)
    assert r.exit_code != 0
    assert "127.0.0.1:1" in r.output and "hunter2-secret" not in r.output
    r = run_cli("runs", env={"DIGITSCORE_DATABASE_URL": url})
    assert "hunter2-secret" not in r.output


def test_migration_0003_counts_the_rows_of_existing_runs(any_db_url):
    """A database at revision 0002 with a run and its rows: upgrading fills the new counts
    from the rows and sets the accuracies from them (runs without labelled rows keep NULL)."""
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import text

    from db.session import MIGRATIONS, make_engine

    engine = make_engine(any_db_url)
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0002")
    at = "2026-11-21 10:00:00"
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO models (id, created_at, train_dir, classes, height, width, n_train, "
            "n_valid, loss, epochs, lr, batch_size, seed, ideal_images, sgd_weights, sgd_bias) "
            "VALUES (1, :at, 't', '[\"3\", \"7\"]', 28, 28, 1, 1, 'x', 1, 1, 1, 1, :b, :b, :b)"
        ), {"at": at, "b": b""})
        for run_id in (1, 2):
            conn.execute(text(
                "INSERT INTO runs (id, model_id, source_dir, backend, status, n_skipped, "
                "n_scored, n_failed, created_at) VALUES (:r, 1, '/d', 'embedded', 'done', 0, "
                "0, 0, :at)"), {"r": run_id, "at": at})
        rows = [  # path, label, l1, l2, sgd, error
            ("3/a", "3", "3", "3", "7", None), ("3/b", "3", "7", "3", "3", None),
            ("7/c", "7", "7", "3", "7", None), ("x/d", None, "3", "3", "3", None),
            ("3/e", "3", None, None, None, "bad"),
        ]
        for path, label, l1, l2, sgd, error in rows:
            conn.execute(text(
                "INSERT INTO predictions (run_id, batch_seq, path, label, pred_l1, pred_l2, "
                "pred_sgd, error, scored_at) VALUES (1, 0, :p, :l, :a, :b, :c, :e, :at)"),
                {"p": path, "l": label, "a": l1, "b": l2, "c": sgd, "e": error, "at": at})
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
    with engine.connect() as conn:
        got = {r.id: r for r in conn.execute(text(
            "SELECT id, n_labelled, n_correct_l1, n_correct_l2, n_correct_sgd, accuracy_l1, "
            "accuracy_l2, accuracy_sgd FROM runs"))}
    engine.dispose()
    assert tuple(got[1])[1:5] == (3, 2, 2, 2)
    assert [round(x, 12) for x in tuple(got[1])[5:]] == [round(2 / 3, 12)] * 3
    assert tuple(got[2])[1:] == (0, 0, 0, 0, None, None, None)


def test_head_revision_is_alembics_own_head():
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from db.session import MIGRATIONS, head_revision

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    assert head_revision() == ScriptDirectory.from_config(cfg).get_current_head()


def test_a_current_schema_costs_no_migration_work(any_db_url, monkeypatch):
    """A process that opens a database already at the head runs no Alembic at all."""
    from alembic import command

    from db.session import dispose_engines, schema_is_current

    engine = get_engine(any_db_url)  # creates the schema
    assert schema_is_current(engine)
    dispose_engines()

    def refuse(*_args, **_kwargs):
        raise AssertionError("alembic upgrade ran on a current schema")

    monkeypatch.setattr(command, "upgrade", refuse)
    assert "runs" in inspect(get_engine(any_db_url)).get_table_names()
    with get_engine(any_db_url).begin() as conn:  # an older revision: upgraded as before
        conn.execute(text("UPDATE alembic_version SET version_num = '0004'"))
    dispose_engines()
    with pytest.raises(AssertionError, match="current schema"):
        get_engine(any_db_url)
@pytest.mark.integration
def test_a_forked_child_forgets_the_parents_connections_without_closing_them(postgres_url):
    """A worker's main process keeps a database connection (it counts worker deaths) and
    forks pool processes: a child's dispose must leave the parent's session alive."""
    import os

    from db.session import dispose_engines

    engine = get_engine(postgres_url)
    with engine.connect() as conn:
        pid = conn.execute(text("SELECT pg_backend_pid()")).scalar()
    child = os.fork()
    if child == 0:  # the pool process
        dispose_engines(close=False)
        os._exit(0)
    assert os.waitpid(child, 0)[1] == 0
    with engine.connect() as conn:
        assert conn.execute(text("SELECT pg_backend_pid()")).scalar() == pid


def test_migrating_logs_one_line_and_no_migration_docstrings(sqlite_url, caplog):
    """A worker's first start migrates the database: its log gets one line saying so, not
    Alembic's line per migration with the migration's docstring."""
    import logging

    caplog.set_level(logging.INFO)
    logging.getLogger("alembic").setLevel(logging.INFO)  # as a logging setup may leave it
    get_engine(sqlite_url)
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "Running upgrade" in m or "Initial schema" in m]
    from db.session import head_revision

    assert [m for m in messages if "is at revision" in m] == [
        f"database schema {sqlite_url} is at revision {head_revision()}"
    ]


def test_paths_sort_by_their_bytes_on_every_database(any_db_url):
    """``ORDER BY path`` gives Python's order on SQLite and on PostgreSQL (migration 0019),
    whatever the server's locale, and so do the kept lists' path columns."""
    from core.columns import batch_columns, unscored_row
    from db import batch_life
    from tests.support import add_model, new_run

    engine = get_engine(any_db_url)
    run_id = new_run(engine, add_model(engine, ["3"]))
    paths = ["b.png", "B.png", "_x.png", "a b.png", "é.png", "Z/1.png", "z.png", "10.png"]
    with engine.begin() as conn:
        batch_life.record_batch(conn, run_id, 0, paths, 0)
    rows = batch_columns([unscored_row(p, "3") for p in paths])
    assert batch_life.store_batch(engine, run_id, 0, rows, "failed") == len(paths)
    with engine.connect() as conn:
        stored = conn.execute(text(
            "SELECT path FROM predictions WHERE run_id = :r ORDER BY path"), {"r": run_id})
        assert stored.scalars().all() == sorted(paths)
        if engine.dialect.name == "postgresql":
            collations = conn.execute(text(
                "SELECT table_name, collation_name FROM information_schema.columns "
                "WHERE column_name = 'path' AND table_name IN "
                "('predictions', :partition, 'run_mistakes', 'run_unsure')"),
                {"partition": f"predictions_run_{run_id}"}).all()
            assert sorted(collations) == [
                ("predictions", "C"), (f"predictions_run_{run_id}", "C"),
                ("run_mistakes", "C"), ("run_unsure", "C")]
