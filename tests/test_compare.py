"""`producer compare RUN_A RUN_B` on two real runs (a good and a weak model, over directories
that differ by a file each), checked against the prediction rows on both databases."""

from __future__ import annotations

import json
import shutil

import pytest

from core.training import fit
from db.session import get_engine
from tests.support import prediction_rows, save_model, submit_embedded

PREDICTORS = ("l1", "l2", "sgd")


@pytest.fixture(scope="module")
def weak_classifier(train_data):
    return fit(train_data, epochs=1, lr=0.01, batch_size=256, seed=1)


@pytest.fixture
def two_runs(any_db_url, sample_dir, classifier, weak_classifier, tmp_path):
    engine = get_engine(any_db_url)
    dir_a, dir_b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(sample_dir / "valid", dir_a)
    shutil.copytree(sample_dir / "valid", dir_b)
    shutil.copy(sorted((dir_a / "3").glob("*.png"))[0], dir_a / "3" / "only_a.png")
    shutil.copy(sorted((dir_b / "7").glob("*.png"))[0], dir_b / "7" / "only_b.png")
    (dir_b / "3" / "broken_in_b.png").write_bytes(b"x")
    (dir_a / "3" / "broken_in_b.png").write_bytes(
        sorted((dir_a / "3").glob("0*.png"))[1].read_bytes()
    )
    run_a = submit_embedded(engine, classifier, save_model(engine, classifier), dir_a)
    run_b = submit_embedded(engine, weak_classifier, save_model(engine, weak_classifier), dir_b)
    return any_db_url, engine, run_a, run_b


def _accuracy(rows: list[dict], p: str, label: str | None = None) -> float:
    chosen = [
        r
        for r in rows
        if r["error"] is None and r["label"] is not None and label in (None, r["label"])
    ]
    return sum(r[f"pred_{p}"] == r["label"] for r in chosen) / len(chosen)


def test_compare_agrees_with_the_prediction_rows(two_runs, run_cli):
    url, engine, run_a, run_b = two_runs
    r = run_cli(
        "compare", str(run_a), str(run_b), "--json", "--limit", "1000", "--database-url", url
    )
    assert r.exit_code == 0, r.output
    c = json.loads(r.stdout)
    rows_a = {x["path"]: x for x in prediction_rows(engine, run_a)}
    rows_b = {x["path"]: x for x in prediction_rows(engine, run_b)}
    both = rows_a.keys() & rows_b.keys()
    assert c["paths"] == {
        "both": len(both),
        "only_a": len(rows_a.keys() - rows_b.keys()),
        "only_b": len(rows_b.keys() - rows_a.keys()),
    }
    assert c["paths"]["only_a"] == c["paths"]["only_b"] == 1

    overall = {x["predictor"]: x for x in c["accuracy"]}
    for p in PREDICTORS:
        a = _accuracy(list(rows_a.values()), p)
        b = _accuracy(list(rows_b.values()), p)
        assert overall[p]["accuracy_a"] == pytest.approx(a)
        assert overall[p]["accuracy_b"] == pytest.approx(b)
        assert overall[p]["delta"] == pytest.approx(b - a)
    assert overall["sgd"]["delta"] < 0  # the weak model is worse
    for row in c["per_class"]:
        a = _accuracy(list(rows_a.values()), row["predictor"], row["label"])
        b = _accuracy(list(rows_b.values()), row["predictor"], row["label"])
        assert row["delta"] == pytest.approx(b - a)
    assert len(c["per_class"]) == 3 * 2

    def differs(x: dict, y: dict) -> bool:
        keys = [f"pred_{p}" for p in PREDICTORS] + ["error"]
        return any(x[k] != y[k] for k in keys)

    changed = sorted(p for p in both if differs(rows_a[p], rows_b[p]))
    assert [x["path"] for x in c["changed"]] == changed
    assert c["n_changed"] == len(changed) > 0
    assert "3/broken_in_b.png" in changed  # scored in A, an error row in B
    broken = next(x for x in c["changed"] if x["path"] == "3/broken_in_b.png")
    assert broken["a_error"] is None and broken["b_error"] and broken["b_sgd"] is None

    scored_both = [p for p in both if rows_a[p]["error"] is None and rows_b[p]["error"] is None]
    for p in PREDICTORS:
        k = f"pred_{p}"
        got = c["changes"][p]
        assert got["changed"] == sum(rows_a[x][k] != rows_b[x][k] for x in scored_both)
        labelled = [x for x in scored_both if rows_a[x]["label"] is not None]
        assert got["fixed"] == sum(
            rows_a[x][k] != rows_a[x]["label"] == rows_b[x][k] for x in labelled
        )
        assert got["broken"] == sum(
            rows_a[x][k] == rows_a[x]["label"] != rows_b[x][k] for x in labelled
        )
    assert c["changes"]["sgd"]["broken"] > 0


def test_compare_text_lists_at_most_limit_changes(two_runs, run_cli):
    url, engine, run_a, run_b = two_runs
    r = run_cli("compare", str(run_a), "latest", "--limit", "3", "--database-url", url)
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    n_changed = json.loads(
        run_cli("compare", str(run_a), str(run_b), "--json", "--database-url", url).stdout
    )["n_changed"]
    assert f"(first 3 of {n_changed})" in r.stdout
    start = next(i for i, line in enumerate(lines) if line.startswith("path "))
    listed = lines[start + 1 :]
    assert len(listed) == 3
    assert all("->" in line for line in listed)
    sgd_overall = next(line for line in lines if line.startswith("SGD") and "overall" in line)
    assert sgd_overall.split()[-1].startswith("-")  # delta B - A is negative
    r = run_cli("compare", str(run_a), "99", "--database-url", url)
    assert r.exit_code == 2 and "run 99 does not exist" in r.output


def test_compare_of_runs_with_no_path_in_common_shows_only_accuracies(
    run_cli, sqlite_url, sample_dir, classifier, tmp_path
):
    """Two runs of different images (3s against 7s): compare says they have no image in
    common and shows the accuracy of each, no per-class deltas nor changed predictions."""
    engine = get_engine(sqlite_url)
    model = save_model(engine, classifier)
    threes, sevens = tmp_path / "threes", tmp_path / "sevens"
    shutil.copytree(sample_dir / "valid" / "3", threes / "3")
    shutil.copytree(sample_dir / "valid" / "7", sevens / "7")
    run_a = submit_embedded(engine, classifier, model, threes)
    run_b = submit_embedded(engine, classifier, model, sevens)
    db = ["--database-url", sqlite_url]
    r = run_cli("compare", str(run_a), str(run_b), *db)
    assert r.exit_code == 0, r.output
    assert "no image is in both runs" in r.stdout
    assert "images by path: 0 in both, 100 only in A, 100 only in B" in r.stdout
    assert "delta" not in r.stdout and "changed" not in r.stdout
    rows_a = prediction_rows(engine, run_a)
    sgd_a = sum(x["pred_sgd"] == x["label"] for x in rows_a) / len(rows_a)
    sgd_line = next(line for line in r.stdout.splitlines() if line.startswith("SGD"))
    assert sgd_line.split()[1:3] == ["100", "100"] and f"{100 * sgd_a:.1f}%" in sgd_line
    c = json.loads(run_cli("compare", str(run_a), str(run_b), "--json", *db).stdout)
    assert c["disjoint"] is True and c["n_changed"] == 0


def test_one_changed_prediction_is_singular(two_runs, run_cli):
    url, engine, run_a, run_b = two_runs
    r = run_cli("compare", str(run_a), str(run_b), "--json", "--database-url", url)
    c = json.loads(r.stdout)
    assert c["disjoint"] is False
    from producer.compare import format_comparison

    c["changes"]["l1"]["changed"] = 1
    assert "1 prediction changed;" in format_comparison(c)
