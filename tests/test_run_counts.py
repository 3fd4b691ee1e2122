"""The counts each batch's commit keeps (``run_counts``, ``run_failures``) and its kept most
confident mistakes (``run_mistakes``) equal what the SQL views and a sort of ``predictions``
give, whatever batches arrive; migration 0006 fills them for existing runs; the reports read
them, and the first failures and ``compare --limit``'s rows, through indexes."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest
from sqlalchemy import Engine, text

from core import defaults
from core.columns import PREDICTORS, PredictionRow, batch_columns, label_for, unscored_row
from db import batch_life, mistakes, queries, reads, views
from db.batch_life import poison_rows
from db.session import get_engine
from producer.report import build_report
from tests.count_checks import assert_counts_agree
from tests.support import add_model, new_run, score_and_store

CLASSES = ["0", "1", "2"]
FOLDERS = [*CLASSES, "unlabelled"]
AT = "2026-11-24 10:00:00"
ERRORS = ["empty file (0 bytes)", "image could not be decoded: OSError: truncated", "gone"]


def made_up_rows(rng: random.Random, paths: list[str]) -> list[PredictionRow]:
    """A row per path: an error now and then, else random answers; confidences from a few
    values, so that mistakes tie and the order by path matters."""
    rows = []
    for path in paths:
        row = unscored_row(path, label_for(path, CLASSES))
        if rng.random() < 0.15:
            row["error"] = rng.choice(ERRORS)
        else:
            for p in PREDICTORS:
                row[f"pred_{p}"] = rng.choice(CLASSES)  # type: ignore[literal-required]
            row["dist_l1"] = rng.choice([0.1, 0.2, 0.3])
            row["dist_l2"] = rng.choice([0.1, 0.2, 0.1 + rng.random()])
            row["prob_sgd"] = rng.choice([1.0, 0.9, rng.random()])
        rows.append(row)
    return rows


@pytest.mark.integration
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kept_counts_equal_the_views_after_any_batches(any_db_url, seed, monkeypatch):
    """Two runs take random batches: new ones (some repeating a path), redeliveries scored
    differently, batches overlapping earlier ones, poison batches; after every batch each
    run's counts equal the views' aggregates, its failures the GROUP BY of its rows, and its
    kept mistakes (7 here, so that batches push some out) the top of a sort of its rows.

    Batches overlapping earlier ones only on SQLite, whose unique (run_id, path) index is
    kept while the run is written: on PostgreSQL a run's index is built when it is finished,
    and the producer never records a path in two batches (test_partitions.py)."""
    monkeypatch.setattr(defaults, "MISTAKES_KEPT", 7)
    rng = random.Random(seed)
    engine = get_engine(any_db_url)
    fates = ["new", "redelivered", "poison"]
    if engine.dialect.name == "sqlite":
        fates.append("overlapping")
    model_id = add_model(engine, CLASSES)
    runs = [new_run(engine, model_id), new_run(engine, model_id)]
    sent: dict[int, list[list[str]]] = {r: [] for r in runs}
    fresh = iter(range(1_000_000))
    kinds: Counter[str] = Counter()
    for _ in range(14):
        run_id = rng.choice(runs)
        batches = sent[run_id]
        kind = rng.choice(fates) if batches else "new"
        kinds[kind] += 1
        new_paths = [f"{rng.choice(FOLDERS)}/{next(fresh)}.png" for _ in range(rng.randint(1, 40))]
        if kind == "new" and rng.random() < 0.3:
            new_paths.append(new_paths[0])  # a path twice in one batch: the first row counts
        if kind == "redelivered":
            seq = rng.randrange(len(batches))
            paths = batches[seq]
        else:
            paths = new_paths
            if kind == "overlapping":
                paths = rng.sample(rng.choice(batches), 3) + new_paths
            seq = len(batches)
            batches.append(paths)
            with engine.begin() as conn:
                batch_life.record_batch(conn, run_id, seq, paths, 0)
        if kind == "poison":
            rows, status = poison_rows(paths, CLASSES, 3), "failed"
        else:
            rows, status = made_up_rows(rng, paths), "done"
        n_new = batch_life.store_batch(engine, run_id, seq, batch_columns(rows), status)
        if kind == "redelivered":
            assert n_new == 0
        for r in runs:
            assert_counts_agree(engine, r)
    assert kinds["new"] and len(kinds) >= 3, kinds  # the seeds give a mix
    with engine.connect() as conn:
        report = build_report(conn, runs[0])
        n_labelled = conn.execute(text(
            "SELECT COUNT(*) FROM predictions WHERE run_id = :r AND error IS NULL "
            "AND label IS NOT NULL"), {"r": runs[0]}).scalar_one()
    assert report["counts"]["labelled"] == n_labelled
    assert sum(map(sum, report["predictors"]["sgd"]["confusion"])) == n_labelled


@pytest.mark.integration
def test_kept_counts_of_real_batches_with_errors_redeliveries_and_poison(
    any_db_url, classifier, sample_dir
):
    """Real digits scored in process, with unreadable and undecodable files; the first batch
    delivered again; a poison batch stored as ``failed``: the counts follow the rows."""
    engine = get_engine(any_db_url)
    classes = list(classifier.classes)
    model_id = add_model(engine, classes)
    run_id = new_run(engine, model_id)
    files = sorted((sample_dir / "valid").glob("*/*.png"))[::5]
    paths = [f"{f.parent.name}/{f.name}" for f in files]
    blobs: list[bytes | None] = [f.read_bytes() for f in files]
    blobs[1], blobs[2] = b"", b"not a png"
    blobs[3] = None
    errors = [None, None, None, "file could not be read: Permission denied"] + [None] * len(
        files
    )
    half = len(paths) // 2
    with engine.begin() as conn:
        batch_life.record_batch(conn, run_id, 0, paths[:half], 0)
        batch_life.record_batch(conn, run_id, 1, paths[half:], 0)
        batch_life.record_batch(conn, run_id, 2, ["3/p.png", "7/q.png", "x/r.png"], 0)
    assert score_and_store(engine, classifier, run_id, 0, paths[:half], blobs[:half],
                           errors[:half]) == half
    before = assert_counts_agree(engine, run_id)
    assert score_and_store(engine, classifier, run_id, 0, paths[:half], blobs[:half],
                           errors[:half]) == 0
    assert assert_counts_agree(engine, run_id) == before
    score_and_store(engine, classifier, run_id, 1, paths[half:], blobs[half:], errors[half:])
    poisoned = poison_rows(["3/p.png", "7/q.png", "x/r.png"], classes, 3)
    batch_life.store_batch(engine, run_id, 2, batch_columns(poisoned), "failed")
    counts = assert_counts_agree(engine, run_id)
    with engine.connect() as conn:
        reasons = {r["error"]: r["n"] for r in reads.failure_reasons(conn, run_id)}
        run = queries.get_run(conn, run_id)
    assert sum(n for cells in counts["sgd"].values() for n in cells.values()) == len(paths) - 3
    assert reasons["file could not be read: Permission denied"] == 1
    assert sum(n for e, n in reasons.items() if "poison batch" in e) == 3
    assert run["n_failed"] == 6 and run["status"] == "running"


@pytest.mark.integration
def test_migration_0006_counts_the_rows_of_existing_runs(any_db_url):
    """A database at revision 0004 with runs and rows: upgrading fills run_counts and
    run_failures from the rows, and run_mistakes with each predictor's 100 surest mistakes
    (run 4 has 150, tying in pairs); a run without rows gets none."""
    from alembic import command
    from alembic.config import Config

    from db.session import MIGRATIONS, make_engine

    engine = make_engine(any_db_url)
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0004")
    model_id = add_model(engine, ["3", "7"])
    rows = {  # run: [(path, label, l1, l2, sgd, error, confidence)]
        1: [("3/a", "3", "3", "3", "7", None, 0.5), ("3/b", "3", "7", "3", "3", None, 0.25),
            ("7/c", "7", "7", "3", "7", None, 0.75), ("x/d", None, "3", "3", "3", None, 0.5),
            ("3/e", "3", None, None, None, "bad", None),
            ("7/f", "7", None, None, None, "bad", None),
            ("7/g", "7", None, None, None, "worse", None)],
        2: [("7/a", "7", "7", "7", "7", None, 0.5), ("7/b", "7", "7", "7", "3", None, 0.5)],
        3: [],
        4: [(f"3/{i:03}", "3", "7", "7", "7", None, (i // 2) / 1000) for i in range(150)],
    }
    with engine.begin() as conn:
        for run_id, run_rows in rows.items():
            conn.execute(text(
                "INSERT INTO runs (id, model_id, source_dir, backend, status, n_skipped, "
                "n_scored, n_failed, created_at) VALUES (:r, :m, '/d', 'embedded', 'done', 0, "
                "0, 0, :at)"), {"r": run_id, "m": model_id, "at": AT})
            if run_rows:
                conn.execute(text(
                    "INSERT INTO predictions (run_id, batch_seq, path, label, pred_l1, "
                    "pred_l2, pred_sgd, dist_l1, dist_l2, prob_sgd, error, scored_at) VALUES "
                    "(:r, 0, :p, :l, :a, :b, :c, :d, :d, :d, :e, :at)"), [
                    {"r": run_id, "p": path, "l": label, "a": l1, "b": l2, "c": sgd, "e": error,
                     "d": d, "at": AT}
                    for path, label, l1, l2, sgd, error, d in run_rows])
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
    with engine.connect() as conn:
        counts = Counter({
            (r, p, label, pred): n for r, p, label, pred, n in conn.execute(text(
                "SELECT run_id, predictor, label, predicted, n FROM run_counts"))
        })
        failures = {(r, e): n for r, e, n in conn.execute(text(
            "SELECT run_id, error, n FROM run_failures"))}
        kept = {
            (r, p): list(conn.execute(mistakes.kept_query(r, p, 2000)).scalars())
            for r in rows for p in PREDICTORS
        }
    engine.dispose()
    expected: Counter[tuple[int, str, str, str]] = Counter()
    expected_kept = {}
    for run_id, run_rows in rows.items():
        for _, label, *preds, error, _d in run_rows:
            if error is None and label is not None:
                for p, pred in zip(PREDICTORS, preds, strict=True):
                    expected[(run_id, p, label, pred)] += 1
        for i, p in enumerate(PREDICTORS):
            wrong = [(d if p != "sgd" else -d, path) for path, label, *preds, error, d in run_rows
                     if error is None and label is not None and preds[i] != label]
            expected_kept[(run_id, p)] = [path for _, path in sorted(wrong)[:100]]
    assert counts == expected
    assert counts[(1, "sgd", "3", "7")] == 1 and counts[(2, "l1", "7", "7")] == 2
    assert failures == {(1, "bad"): 2, (1, "worse"): 1}
    assert kept == expected_kept
    assert kept[(1, "l1")] == ["3/b"] and kept[(2, "sgd")] == ["7/b"]
    assert kept[(4, "sgd")][:3] == ["3/148", "3/149", "3/146"]
    assert len(kept[(4, "l1")]) == 100 and kept[(4, "l1")][-1] == "3/099"


# ------------------------------------------------------------------ bounded reads


@pytest.fixture
def mistakes_run(any_db_url, monkeypatch) -> tuple[Engine, int, list[PredictionRow]]:
    """A run of 3,000 made-up rows in 30 batches, many mistakes tying on confidence, keeping
    10 mistakes per predictor; and a second run of the same paths, answers shifted (for
    compare's plan)."""
    monkeypatch.setattr(defaults, "MISTAKES_KEPT", 10)
    rng = random.Random(7)
    engine = get_engine(any_db_url)
    run_id = new_run(engine, add_model(engine, CLASSES))
    stored: list[PredictionRow] = []
    for seq in range(30):
        paths = [f"{rng.choice(FOLDERS)}/{seq}-{i}.png" for i in range(100)]
        with engine.begin() as conn:
            batch_life.record_batch(conn, run_id, seq, paths, 0)
        rows = made_up_rows(rng, paths)
        batch_life.store_batch(engine, run_id, seq, batch_columns(rows))
        stored += rows
    with engine.connect() as conn:  # while running, each list holds a superset of its top
        assert conn.execute(text("SELECT COUNT(*) FROM run_mistakes WHERE run_id = :r"),
                            {"r": run_id}).scalar_one() > 3 * 10
    assert queries.finish_submission(engine, run_id, len(stored), 0) == "done"
    other = new_run(engine, add_model(engine, CLASSES))
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO predictions (run_id, batch_seq, path, label, pred_l1, pred_l2, "
            "pred_sgd, dist_l1, dist_l2, prob_sgd, error, scored_at) SELECT :o, batch_seq, "
            "path, label, pred_l2, pred_sgd, pred_l1, dist_l1, dist_l2, prob_sgd, error, "
            "scored_at FROM predictions WHERE run_id = :r"), {"o": other, "r": run_id})
        queries.index_run_rows(conn, other)  # as when it is finished
        conn.execute(text("ANALYZE"))
    return engine, run_id, stored


@pytest.mark.integration
def test_confident_mistakes_and_first_failures_are_the_top_of_the_run(mistakes_run):
    """The kept mistakes (10) and, for longer lists, the scan of the run equal a sort of all
    the run's rows: surest first, ties by path; the first failures by path."""
    engine, run_id, stored = mistakes_run
    with engine.connect() as conn:
        for p in PREDICTORS:
            wrong = [r for r in stored if r["error"] is None and r["label"] is not None
                     and r[f"pred_{p}"] != r["label"]]  # type: ignore[literal-required]
            sign = -1 if p == "sgd" else 1
            score = {"l1": "dist_l1", "l2": "dist_l2", "sgd": "prob_sgd"}[p]
            wrong.sort(key=lambda r: (sign * r[score], r["path"]))  # type: ignore[literal-required]
            for n in (3, 10, 24):
                got = mistakes.confident_mistakes(conn, run_id, p, n)
                assert [r["path"] for r in got] == [r["path"] for r in wrong[:n]]
            assert len({r[score] for r in got}) < 24  # ties, ordered by path
            n_kept = conn.execute(text(
                "SELECT COUNT(*) FROM run_mistakes WHERE run_id = :r AND predictor = :p"),
                {"r": run_id, "p": p}).scalar_one()
            assert n_kept == 10
        first = queries.failures(conn, run_id, 20)
    failed = sorted((r["path"], r["error"]) for r in stored if r["error"] is not None)
    assert first == failed[:20]


@pytest.mark.integration
def test_confident_mistakes_failures_and_compare_read_an_index_not_the_run(mistakes_run):
    """The plans walk an index in the order asked for and sort nothing, so that the LIMIT
    ends the read: ``run_mistakes``' index for the top N mistakes per predictor, whose rows
    are then found by path; the partial index for the first failures; the unique
    (run_id, path) index for ``compare --limit``."""
    engine, run_id, _ = mistakes_run
    sqlite = engine.dialect.name == "sqlite"

    def plan(query: Any) -> str:
        sql = str(query.compile(engine, compile_kwargs={"literal_binds": True}))
        explain = "EXPLAIN QUERY PLAN" if sqlite else "EXPLAIN"
        with engine.connect() as conn:
            lines = [r[3] if sqlite else r[0] for r in conn.exec_driver_sql(f"{explain} {sql}")]
        return " | ".join(lines)

    with engine.begin() as conn:  # as when a run has many mistakes
        conn.execute(text("INSERT INTO run_mistakes (run_id, predictor, path, rank_key) "
                          "SELECT run_id, 'x', path, 0 FROM predictions"))
        conn.execute(text("ANALYZE"))
    for p in PREDICTORS:
        got = plan(mistakes.kept_query(run_id, p, 24))
        if sqlite:
            assert got == ("SEARCH run_mistakes USING COVERING INDEX ix_run_mistakes_rank "
                           "(run_id=? AND predictor=?)"), got
        else:
            assert "Index Only Scan using ix_run_mistakes_rank" in got and "Sort" not in got, got
    got = plan(mistakes.rows_query(run_id, ["3/a.png", "1/b.png"]))
    if sqlite:
        assert got == (
            "SEARCH predictions USING INDEX sqlite_autoindex_predictions_1 (run_id=? AND path=?)"
        )
    else:
        assert f"Index Scan using predictions_run_{run_id}_path" in got, got
        assert "Seq Scan" not in got, got
    got = plan(queries.failures_query(run_id, 20))
    if sqlite:
        assert got == "SEARCH predictions USING INDEX ix_predictions_failures (run_id=?)"
    else:
        # the partition's copy of the parent's partial index, named by PostgreSQL
        failures = f"predictions_run_{run_id}_run_id_path_idx"
        assert f"Index Scan using {failures} " in got and "Sort" not in got, got
    # compare --limit: run A in path order through the unique index, B by path
    got = plan(views.changed_query(run_id, run_id + 1).limit(50))
    if sqlite:
        assert got.startswith("SEARCH a USING INDEX sqlite_autoindex_predictions_1"), got
        assert "TEMP B-TREE" not in got and "SCAN" not in got, got
    else:
        partition = f"predictions_run_{run_id}"
        assert f"Index Scan using {partition}_path on {partition} a" in got, got
        assert "Sort" not in got and "Seq Scan" not in got, got


@pytest.mark.integration
def test_a_failed_batch_retried_has_its_rows_and_counts_replaced_exactly(any_db_url, seed=4):
    """`resume --retry-failed` requeues a failed batch; the delivery that stores it replaces
    its error rows (and what they counted) by its new rows in one transaction, and the run is
    done only then. A batch of mistakes, failed by hand, is replaced too: its kept mistakes
    go with its rows."""
    rng = random.Random(seed)
    engine = get_engine(any_db_url)
    run_id = new_run(engine, add_model(engine, CLASSES))
    batches = [[f"{rng.choice(FOLDERS)}/{i}-{j}.png" for j in range(30)] for i in range(3)]
    with engine.begin() as conn:
        for seq, paths in enumerate(batches):
            batch_life.record_batch(conn, run_id, seq, paths, 0)
    batch_life.store_batch(engine, run_id, 0, batch_columns(made_up_rows(rng, batches[0])))
    poisoned = batch_columns(poison_rows(batches[1], CLASSES, 3))
    batch_life.store_batch(engine, run_id, 1, poisoned, "failed")
    batch_life.store_batch(engine, run_id, 2, batch_columns(made_up_rows(rng, batches[2])))
    queries.finish_submission(engine, run_id, 90, 0)
    with engine.begin() as conn:
        conn.execute(text("UPDATE batches SET status = 'failed' WHERE seq = 2"))
    assert queries.requeue_failed_batches(engine, run_id) == 2
    with engine.connect() as conn:
        run = queries.get_run(conn, run_id)
    assert (run["status"], run["finished_at"]) == ("running", None) and run["n_failed"] >= 30
    for seq in (1, 2):
        assert batch_life.store_batch(engine, run_id, seq,
                                           batch_columns(made_up_rows(rng, batches[seq]))) == 30
        assert_counts_agree(engine, run_id)
        with engine.connect() as conn:
            run = queries.get_run(conn, run_id)
        assert run["status"] == ("running" if seq == 1 else "done"), seq
    assert run["n_scored"] + run["n_failed"] == 90
    with engine.connect() as conn:
        reasons = [r["error"] for r in reads.failure_reasons(conn, run_id)]
    assert not any("poison batch" in e for e in reasons), reasons
    again = batch_columns(made_up_rows(rng, batches[1]))
    assert batch_life.store_batch(engine, run_id, 1, again) == 0
    assert_counts_agree(engine, run_id)
