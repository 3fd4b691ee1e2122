"""Storing results: idempotent batches, accuracies that SQL recomputes, both databases."""

from __future__ import annotations

from sqlalchemy import text

from core.columns import batch_columns, label_for
from db import batch_life, queries
from db.model_store import load_classifier
from db.session import get_engine
from producer.submit import EmbeddedSender, submit_directory
from tests.support import RECOMPUTE, save_model, score_and_store


def test_run_accuracy_columns_equal_sql_recomputation(any_db_url, sample_dir, classifier):
    engine = get_engine(any_db_url)
    model_id = save_model(engine, classifier)
    (sample_dir / "valid" / "3" / "broken.png").write_bytes(b"not a png")
    try:
        sub = submit_directory(
            engine,
            sample_dir / "valid",
            model_id,
            EmbeddedSender(engine, classifier),
            batch_size=64,
        )
    finally:
        (sample_dir / "valid" / "3" / "broken.png").unlink()
    assert sub.status == "done" and sub.n_images == 201 and sub.n_batches == 4
    with engine.connect() as conn:
        run = queries.get_run(conn, sub.run_id)
        sql = conn.execute(text(RECOMPUTE), {"run": sub.run_id}).mappings().one()
        rows = conn.execute(
            text("SELECT COUNT(*) FROM predictions WHERE run_id = :r"), {"r": sub.run_id}
        ).scalar()
    assert rows == 201
    assert (run["n_scored"], run["n_failed"]) == (sql["n_scored"], sql["n_failed"]) == (200, 1)
    assert run["n_labelled"] == sql["n_labelled"] == 200
    for p in ("l1", "l2", "sgd"):
        assert run[f"n_correct_{p}"] == sql[f"n_correct_{p}"]
        assert abs(run[f"accuracy_{p}"] - float(sql[f"accuracy_{p}"])) < 1e-9
    assert run["accuracy_sgd"] >= 0.95


def test_redelivered_batch_duplicates_nothing(memory_engine, classifier, sample_dir):
    engine = memory_engine
    model_id = save_model(engine, classifier)
    files = sorted((sample_dir / "valid" / "7").glob("*.png"))[:10]
    paths = [f"7/{f.name}" for f in files]
    blobs = [f.read_bytes() for f in files]
    with engine.begin() as conn:
        run_id, _token = queries.create_run(conn, model_id, str(sample_dir / "valid"), "embedded")
        batch_life.record_batch(conn, run_id, 0, paths, sum(map(len, blobs)))
    assert score_and_store(engine, classifier, run_id, 0, paths, blobs) == 10
    assert score_and_store(engine, classifier, run_id, 0, paths, blobs) == 0  # redelivery
    queries.finish_submission(engine, run_id, 10, 0)
    with engine.connect() as conn:
        run = queries.get_run(conn, run_id)
        n = conn.execute(text("SELECT COUNT(*) FROM predictions")).scalar()
    assert n == 10
    assert (run["status"], run["n_scored"], run["n_images"]) == ("done", 10, 10)


def test_model_round_trips_through_the_database(memory_engine, classifier):
    model_id = save_model(memory_engine, classifier)
    with memory_engine.connect() as conn:
        loaded = load_classifier(conn, model_id)
    assert loaded.classes == classifier.classes
    for name in ("ideals", "weights", "bias"):
        assert (getattr(loaded, name) == getattr(classifier, name)).all()


def test_label_is_parent_folder_only_when_it_is_a_class():
    assert label_for("valid/3/a.png", ("3", "7")) == "3"
    assert label_for("a.png", ("3", "7")) is None
    assert label_for("3/x/a.png", ("3", "7")) is None


def test_a_batch_recorded_after_a_split_takes_the_next_free_number(any_db_url, classifier):
    """A worker's split numbers its halves after the run's last batch; the producer's next
    batch, which it meant to number the same, takes the number after them instead of
    failing the submit on the unique (run_id, seq)."""
    from core.files import FileBatch
    from db.splits import split_batch
    from producer.submit import record_next

    engine = get_engine(any_db_url)
    model_id = save_model(engine, classifier)
    with engine.begin() as conn:
        run_id, _token = queries.create_run(conn, model_id, "/data", "celery")
        batch_life.record_batch(conn, run_id, 0, ["a.png", "b.png"], 2)
    assert [seq for seq, _ in split_batch(engine, run_id, 0)] == [1, 2]
    batch = FileBatch(paths=["c.png"], blobs=[b"x"], errors=[None], n_bytes=1)
    assert record_next(engine, run_id, 1, batch) == 3
    with engine.connect() as conn:
        got = conn.execute(text(
            "SELECT seq, status, n_images FROM batches WHERE run_id = :r ORDER BY seq"),
            {"r": run_id}).all()
    assert [tuple(r) for r in got] == [(0, "split", 2), (1, "queued", 1), (2, "queued", 1),
                                       (3, "queued", 1)]


def test_a_snapshot_reads_one_commit_while_others_commit(any_db_url, classifier):
    """What a report reads (db.session.snapshot) adds up at one commit: a run recorded by
    another connection meanwhile is not seen by its later statements, on either database."""
    from db.session import snapshot

    engine = get_engine(any_db_url)
    model_id = save_model(engine, classifier)
    count = text("SELECT COUNT(*) FROM runs")
    with snapshot(engine) as conn:
        before = conn.execute(count).scalar_one()
        with engine.begin() as other:
            queries.create_run(other, model_id, "/data", "embedded")
        assert conn.execute(count).scalar_one() == before
    with engine.connect() as conn:
        assert conn.execute(count).scalar_one() == before + 1


def test_a_server_lost_while_settling_is_an_outage_and_the_redelivery_settles(
    postgres_url, classifier, monkeypatch
):
    """The read after a store's commit that tells whether its run may finish runs outside a
    transaction; a server lost during it raises the ``OperationalError`` the task retries,
    and the redelivery writes nothing and settles the run."""
    import psycopg
    import pytest
    from sqlalchemy.exc import OperationalError

    from core.columns import unscored_row

    engine = get_engine(postgres_url)
    model_id = save_model(engine, classifier)
    with engine.begin() as conn:
        run_id, _token = queries.create_run(conn, model_id, "/data", "celery")
        batch_life.record_batch(conn, run_id, 0, ["3/a.png"], 1)
        batch_life.record_batch(conn, run_id, 1, ["3/b.png"], 1)
    queries.finish_submission(engine, run_id, 2, 0)
    batch_life.store_batch(engine, run_id, 0, batch_columns([unscored_row("3/a.png", "3", "gone")]))
    read = batch_life.may_finish

    def lose_the_server(conn, run):
        pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
        plain = postgres_url.replace("+psycopg", "")
        with psycopg.connect(plain, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        return read(conn, run)

    monkeypatch.setattr(batch_life, "may_finish", lose_the_server)
    row = unscored_row("3/b.png", "3", "empty file (0 bytes)")
    with pytest.raises(OperationalError):  # the run's last batch, stored
        batch_life.store_batch(engine, run_id, 1, batch_columns([row]))
    monkeypatch.setattr(batch_life, "may_finish", read)
    assert batch_life.store_batch(engine, run_id, 1, batch_columns([row])) == 0
    with engine.connect() as conn:
        status, failed = conn.execute(text(
            "SELECT status, n_failed FROM runs WHERE id = :r"), {"r": run_id}).one()
    assert (status, failed) == ("done", 2)
