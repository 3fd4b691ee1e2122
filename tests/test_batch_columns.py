"""A batch's rows as columns (core/columns.py): scoring's columns are those of the rows
they stand for; the binary COPY data made from them stores on PostgreSQL exactly what
psycopg's ``write_row`` stores row by row, and the counts and kept-list candidates made from
them equal a plain loop over the rows (unit tests)."""

from __future__ import annotations

import random
from collections import Counter
from datetime import UTC, datetime

import pytest
from sqlalchemy import text

from core import defaults
from core.columns import PREDICTORS, PredictionRow, batch_columns, unscored_row
from core.scoring import score_images
from db.counts import PROB_BINS, count_rows
from db.mistakes import batch_candidates
from db.pg_copy import FIELDS, copy_data
from db.session import get_engine
from tests.support import digit_files

CLASSES = ["0", "1", "7", "ü"]
#: the PostgreSQL type of each field of ``COPY predictions`` (db/pg_copy.FIELDS)
TYPES = ["int4", "int4", *["text"] * 5, *["float8"] * 3, "text", "timestamptz"]


def made_up_rows(rng: random.Random, n: int) -> list[PredictionRow]:
    """Rows as scoring makes them: labelled or not, errors now and then, scores that tie."""
    rows = []
    for i in range(n):
        label = rng.choice([*CLASSES, None])
        path = f"{label or 'x'}/{'é' * rng.choice([1, 2, 600])}{i}.png"
        row = unscored_row(path, label)
        if rng.random() < 0.1:
            row["error"] = rng.choice(["empty file (0 bytes)", "naïve error"])
        else:
            for p in PREDICTORS:
                row[f"pred_{p}"] = rng.choice(CLASSES)  # type: ignore[literal-required]
            row["dist_l1"] = rng.choice([0.1, 0.2, rng.random()])
            row["dist_l2"] = rng.choice([0.1, float("inf"), rng.random()])
            row["prob_sgd"] = rng.choice([1.0, 0.5, rng.random()])
        rows.append(row)
    return rows


@pytest.mark.parametrize("n", [0, 1, 500])
def test_copy_data_stores_what_psycopg_stores_row_by_row(postgres_url, n):
    rows = made_up_rows(random.Random(n), n)
    if rows:
        rows[0] = {**rows[0], "dist_l1": float("nan"), "dist_l2": None}  # a half-scored row
    at = datetime(2026, 12, 2, 5, 6, 7, 891011, tzinfo=UTC)
    engine = get_engine(postgres_url)
    # into a table of predictions' columns: on PostgreSQL a run's rows need its partition
    sql = f"COPY copied ({', '.join(FIELDS)}) FROM STDIN (FORMAT BINARY)"
    with engine.begin() as conn:
        conn.execute(text("CREATE TEMP TABLE copied (LIKE predictions) ON COMMIT DROP"))
        cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        with cursor.copy(sql) as copy:
            copy.write(copy_data(1, 3, batch_columns(rows), at))
        with cursor.copy(sql) as copy:
            copy.set_types(TYPES)
            for r in rows:
                copy.write_row((2, 3, *r.values(), at))
        stored = {
            run: conn.execute(text(
                f"SELECT {', '.join(FIELDS[1:])} FROM copied WHERE run_id = :r "
                "ORDER BY path"), {"r": run}).all()
            for run in (1, 2)
        }
    assert len(stored[1]) == n
    assert repr(stored[1]) == repr(stored[2])  # NaN equals itself only in its text


def test_counts_from_columns_equal_a_loop_over_the_rows():
    rng = random.Random(7)
    for n in (0, 1, 50, 700):
        rows = made_up_rows(rng, n)
        counts = count_rows(batch_columns(rows))
        scored = [r for r in rows if r["error"] is None]
        assert (counts.scored, counts.failed) == (len(scored), n - len(scored))
        assert counts.failures == Counter(r["error"] for r in rows if r["error"])
        assert counts.cells == Counter(
            (p, r["label"], r[f"pred_{p}"]) for r in scored for p in PREDICTORS)  # type: ignore[literal-required]
        assert counts.labelled == sum(r["label"] is not None for r in scored)
        assert counts.correct == tuple(
            sum(r[f"pred_{p}"] == r["label"] for r in scored) for p in PREDICTORS)  # type: ignore[literal-required]
        assert counts.agree == sum(r["pred_l1"] == r["pred_l2"] == r["pred_sgd"] for r in scored)
        assert counts.agree_pairs == tuple(
            sum(r[f"pred_{a}"] == r[f"pred_{b}"] for r in scored)  # type: ignore[literal-required]
            for a, b in (("l1", "l2"), ("l1", "sgd"), ("l2", "sgd")))
        bins = Counter(min(int(r["prob_sgd"] * PROB_BINS), PROB_BINS - 1) for r in scored)  # type: ignore[operator]
        assert counts.prob_bins == tuple(bins[i] for i in range(PROB_BINS))


def test_a_batchs_candidates_are_its_first_mistakes_and_least_confident_by_a_sort():
    rows = made_up_rows(random.Random(3), 3000)
    mistakes, unsure = batch_candidates(batch_columns(rows))
    kept = defaults.MISTAKES_KEPT
    rank = {"l1": ("dist_l1", 1.0), "l2": ("dist_l2", 1.0), "sgd": ("prob_sgd", -1.0)}
    expected = []
    for p, (column, sign) in rank.items():
        wrong = sorted(
            (sign * r[column], r["path"]) for r in rows  # type: ignore[literal-required]
            if r["error"] is None and r["label"] is not None and r[f"pred_{p}"] != r["label"])  # type: ignore[literal-required]
        expected += [(p, path, key) for key, path in wrong[:kept]]
    assert sorted(mistakes) == sorted(expected)  # in any order
    assert sorted(unsure) == sorted((path, key) for key, path in sorted(
        (r["prob_sgd"], r["path"]) for r in rows if r["prob_sgd"] is not None)[:kept])


def test_scorings_columns_are_the_columns_of_their_rows(classifier, sample_dir):
    """What score_images makes straight from its arrays (answer codes into the model's
    classes, one mask for the scores) says what the columns of its rows say: the same
    texts, scores, counts and COPY data, with unreadable and undecodable files among them."""
    threes = [f.read_bytes() for f in digit_files(sample_dir, "3", 3)]
    sevens = [f.read_bytes() for f in digit_files(sample_dir, "7", 2)]
    paths = ["3/a.png", "gone/b.png", "7/c.png", "3/d.png", "x/e.png", "7/f.png", "3/g.png"]
    blobs = [threes[0], None, sevens[0], b"not a png", threes[1], sevens[1], threes[2]]
    made = score_images(classifier, paths, blobs, [None, "file vanished", *[None] * 5])
    rows = made.rows()
    assert [r["error"] is None for r in rows] == [True, False, True, False, True, True, True]
    assert rows[1]["error"] == "file vanished" and rows[1]["label"] is None
    assert [r["label"] for r in rows] == ["3", None, "7", "3", None, "7", "3"]
    assert {r["pred_sgd"] for r in rows} - {None} <= {"3", "7"}
    again = batch_columns(rows)
    for name in ("paths", "labels", "answers", "errors"):
        assert getattr(made, name) == getattr(again, name), name
    assert made.score_lists() == again.score_lists()
    assert count_rows(made) == count_rows(again)
    assert batch_candidates(made) == batch_candidates(again)
    at = datetime(2026, 12, 3, tzinfo=UTC)
    assert copy_data(2, 5, made, at) == copy_data(2, 5, again, at)


def test_taken_columns_are_the_rows_taken():
    rows = made_up_rows(random.Random(7), 40)
    columns = batch_columns(rows)
    keep = [39, 3, 0, 17]
    taken = columns.take(keep)
    assert taken.rows() == [rows[i] for i in keep]
    assert count_rows(taken) == count_rows(batch_columns([rows[i] for i in keep]))
    assert columns.take([]).paths == [] and count_rows(columns.take([])).scored == 0
