"""A run id is never handed out twice: a run deleted by hand (SQL, until `producer delete`
exists) cannot lend its id, and the batches and rows it left, to the next submit."""

from __future__ import annotations

import json
import shutil
import sqlite3

from sqlalchemy import inspect, text

from db.session import dispose_engines, get_engine, make_engine


def _submit(run_cli, directory, db_url) -> int:
    r = run_cli("submit", str(directory), "--wait", "--database-url", db_url)
    assert r.exit_code == 0, r.output
    r = run_cli("report", "latest", "--json", "--database-url", db_url)
    return json.loads(r.stdout)["run"]["id"]


def _delete_run_by_hand(db_url: str, run_id: int) -> None:
    """What a user does with SQL: on SQLite the ``sqlite3`` shell, whose foreign keys are
    off, deletes the run's row alone; PostgreSQL makes them delete its rows first."""
    if db_url.startswith("sqlite"):
        with sqlite3.connect(db_url.removeprefix("sqlite:///")) as conn:
            conn.execute("DELETE FROM runs WHERE id = ?", (run_id,))
        return
    with get_engine(db_url).begin() as conn:
        names = inspect(conn).get_table_names()
        children = [
            t for t in names if "run_id" in {c["name"] for c in inspect(conn).get_columns(t)}
        ]
        for table in sorted(children, key=lambda t: t == "batches"):  # batches last
            conn.execute(text(f'DELETE FROM "{table}" WHERE run_id = :r'), {"r": run_id})
        conn.execute(text("DELETE FROM runs WHERE id = :r"), {"r": run_id})
    dispose_engines()


def _images(db_url: str, run_id: int) -> int:
    with get_engine(db_url).connect() as conn:
        n = conn.execute(text("SELECT COUNT(*) FROM predictions WHERE run_id = :r"), {"r": run_id})
        return n.scalar()


def test_a_run_deleted_by_hand_never_lends_its_id(run_cli, any_model_db, sample_dir, tmp_path):
    three = tmp_path / "three"
    shutil.copytree(sample_dir / "valid" / "3", three / "3")
    first = _submit(run_cli, three, any_model_db)
    second = _submit(run_cli, three, any_model_db)
    _delete_run_by_hand(any_model_db, second)
    third = _submit(run_cli, three, any_model_db)
    assert third > second > first
    assert _images(any_model_db, third) == 100  # its own rows only


def test_runs_shows_when_each_was_created_and_marks_a_repeat(
    run_cli, any_model_db, sample_dir, tmp_path
):
    three = tmp_path / "three"
    shutil.copytree(sample_dir / "valid" / "3", three / "3")
    first, second = _submit(run_cli, three, any_model_db), _submit(run_cli, three, any_model_db)
    other = tmp_path / "other"
    shutil.copytree(sample_dir / "valid" / "7", other / "7")
    third = _submit(run_cli, other, any_model_db)
    listed = json.loads(run_cli("runs", "--json", "--database-url", any_model_db).stdout)
    assert {r["id"]: r["repeats_run"] for r in listed} == {first: None, second: first, third: None}
    text_rows = run_cli("runs", "--database-url", any_model_db).stdout.splitlines()
    assert text_rows[0].split()[:3] == ["id", "created", "status"] and "repeats" in text_rows[0]
    row = next(line.split() for line in text_rows if line.split()[0] == str(second))
    assert row[1] == listed[1]["created_at"][:10] and str(first) in row[-2:]
    assert "Most runs listed" in run_cli("runs", "--help").stdout


def test_the_migration_starts_past_the_ids_a_deleted_run_left(
    run_cli, model_db, sample_dir, tmp_path
):
    """A database from before migration 0015 where a run was deleted by hand (its batches
    and rows left behind): after the upgrade the next run id is past them."""
    from alembic import command
    from alembic.config import Config

    from db.session import MIGRATIONS

    three = tmp_path / "three"
    shutil.copytree(sample_dir / "valid" / "3", three / "3")
    _submit(run_cli, three, model_db)
    second = _submit(run_cli, three, model_db)
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    engine = make_engine(model_db)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0011")  # to the revision before 0015
    engine.dispose()
    _delete_run_by_hand(model_db, second)
    with sqlite3.connect(model_db.removeprefix("sqlite:///")) as conn:
        assert (
            "AUTOINCREMENT"
            not in conn.execute("SELECT sql FROM sqlite_master WHERE name = 'runs'").fetchone()[0]
        )
        assert conn.execute("SELECT COUNT(*) FROM batches WHERE run_id = ?", (second,)).fetchone()[
            0
        ]
    third = _submit(run_cli, three, model_db)  # upgrades to head first
    assert third > second
    assert _images(model_db, third) == 100
    with get_engine(model_db).connect() as conn:
        views = conn.execute(
            text("SELECT COUNT(*) FROM run_accuracy WHERE run_id = :r"), {"r": third}
        )
        assert views.scalar() == 3  # the views over the runs' rows are back
