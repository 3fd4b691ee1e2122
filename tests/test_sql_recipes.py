"""Every SQL recipe of docs/usage.md's "Querying results with SQL" runs, as written, on a
populated SQLite and a populated PostgreSQL database; both give the same rows, and those rows
equal what Python computes from the ``predictions`` rows.

Each recipe is known by its comment line; a recipe without a check here fails the test, so a
new recipe cannot go into the docs unchecked.
"""

from __future__ import annotations

import re
import shutil
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from core.training import fit
from db.session import dispose_engines, get_engine
from tests.support import prediction_rows, save_model, submit_embedded

USAGE = Path(__file__).resolve().parent.parent / "docs" / "usage.md"
SECTION = "## Querying results with SQL"
PREDICTORS = ("l1", "l2", "sgd")


def usage_recipes() -> list[tuple[str, str]]:
    """``(comment, statement)`` for every statement of every ```sql block in the section."""
    doc = USAGE.read_text("utf-8")
    start = doc.index(SECTION)
    end = doc.find("\n## ", start + len(SECTION))
    section = doc[start : end if end >= 0 else len(doc)]
    recipes: list[tuple[str, str]] = []
    for block in re.findall(r"```sql\n(.*?)```", section, flags=re.S):
        comment, lines = "", []
        for line in block.splitlines():
            stripped = line.strip()
            if stripped.startswith("--"):
                comment = comment or stripped.lstrip("-").strip()
                continue
            if stripped:
                lines.append(line)
            if stripped.endswith(";"):
                recipes.append((comment, "\n".join(lines).rstrip(";").strip()))
                comment, lines = "", []
        assert not lines, f"statement without ';' in docs/usage.md: {lines}"
    return recipes


RECIPES = usage_recipes()


def test_the_docs_have_recipes_over_every_view():
    sql = "\n".join(statement for _, statement in RECIPES)
    assert len(RECIPES) >= 8
    for view in ("run_accuracy", "run_class_accuracy", "run_confusion", "prediction_outcomes"):
        assert f"FROM {view}" in sql


# ------------------------------------------------------------------ the populated databases


@pytest.fixture(scope="module")
def weak_classifier(train_data):
    return fit(train_data, epochs=1, lr=0.01, batch_size=256, seed=1)


def _populate(url: str, root: Path, classifier: Any, weak: Any) -> dict[int, list[dict]]:
    """Run 1: the good model; run 2: a weak one; same files. Rows of each run by run id."""
    engine = get_engine(url)
    runs = {}
    for clf in (classifier, weak):
        run_id = submit_embedded(engine, clf, save_model(engine, clf), root)
        runs[run_id] = prediction_rows(engine, run_id)
    assert sorted(runs) == [1, 2]
    return runs


@pytest.fixture(scope="module")
def postgres_module_url(postgres_server: str) -> Iterator[str]:
    """Like conftest's ``postgres_url``, but one fresh database for this module's tests,
    which only read it."""
    import psycopg

    name = f"digitscore_recipes_{uuid.uuid4().hex[:12]}"
    admin = postgres_server.replace("+psycopg", "")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield f"{postgres_server.rpartition('/')[0]}/{name}"
    dispose_engines()
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def databases(postgres_module_url, sample_dir, classifier, weak_classifier, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("recipes")
    sqlite_url = f"sqlite:///{tmp_path / 'digitscore.db'}"
    postgres_url = postgres_module_url
    root = tmp_path / "images"
    shutil.copytree(sample_dir / "valid", root)
    (root / "3" / "broken.png").write_bytes(b"not a png")
    (root / "7" / "empty.png").write_bytes(b"")
    (root / "unlabelled").mkdir()
    shutil.copy(sorted((root / "7").glob("0*.png"))[3], root / "unlabelled" / "x.png")
    rows = _populate(sqlite_url, root, classifier, weak_classifier)
    rows_pg = _populate(postgres_url, root, classifier, weak_classifier)
    for run_id in rows:  # the same model and files give the same predictions in both
        keys = ("path", "label", "pred_l1", "pred_l2", "pred_sgd", "error")
        assert [[r[k] for k in keys] for r in rows[run_id]] == [
            [r[k] for k in keys] for r in rows_pg[run_id]
        ]
    return {"sqlite": sqlite_url, "postgresql": postgres_url}, rows


# ------------------------------------------------------------------ independent expectations


def scored(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["error"] is None]


def labelled(rows: list[dict]) -> list[dict]:
    return [r for r in scored(rows) if r["label"] is not None]


def accuracy(rows: list[dict], p: str) -> tuple[int, int, float]:
    n = len(rows)
    right = sum(r[f"pred_{p}"] == r["label"] for r in rows)
    return n, right, right / n


def class_accuracy(rows: list[dict]) -> dict[tuple[str, str], tuple[int, int, float]]:
    out = {}
    for p in PREDICTORS:
        for label in {r["label"] for r in labelled(rows)}:
            out[(p, label)] = accuracy([r for r in labelled(rows) if r["label"] == label], p)
    return out


Rows = list[dict[str, Any]]
Runs = dict[int, list[dict]]


def check_runs(got: Rows, runs: Runs) -> None:
    assert [g["id"] for g in got] == [2, 1]
    for g in got:
        rows = runs[g["id"]]
        assert (g["n_images"], g["n_scored"], g["n_failed"]) == (
            len(rows),
            len(scored(rows)),
            len(rows) - len(scored(rows)),
        )
        for p in PREDICTORS:
            assert g[f"accuracy_{p}"] == pytest.approx(accuracy(labelled(runs[g["id"]]), p)[2])


def check_sgd_wrong(got: Rows, runs: Runs) -> None:
    wrong = {r["path"] for r in labelled(runs[1]) if r["pred_sgd"] != r["label"]}
    assert {g["path"] for g in got} == wrong and wrong
    probs = [g["prob_sgd"] for g in got]
    assert probs == sorted(probs)


def check_disagree(got: Rows, runs: Runs) -> None:
    want = {
        r["path"]
        for r in scored(runs[1])
        if r["pred_l1"] != r["pred_l2"] or r["pred_l2"] != r["pred_sgd"]
    }
    assert {g["path"] for g in got} == want and want


def check_failures(got: Rows, runs: Runs) -> None:
    want = Counter(r["error"] for r in runs[1] if r["error"] is not None)
    assert {tuple(g.values()) for g in got} == set(want.items())
    assert len(want) == 2


def check_run_accuracy(got: Rows, runs: Runs) -> None:
    assert [g["predictor"] for g in got] == sorted(PREDICTORS)
    for g in got:
        n, right, acc = accuracy(labelled(runs[1]), g["predictor"])
        assert (g["n_images"], g["n_correct"]) == (n, right)
        assert g["accuracy"] == pytest.approx(acc)


def check_class_accuracy(got: Rows, runs: Runs) -> None:
    want = class_accuracy(runs[1])
    assert {(g["predictor"], g["label"]) for g in got} == set(want)
    for g in got:
        n, right, acc = want[(g["predictor"], g["label"])]
        assert (g["n_images"], g["n_correct"]) == (n, right)
        assert g["accuracy"] == pytest.approx(acc)
    assert [g["accuracy"] for g in got] == sorted(g["accuracy"] for g in got)


def check_sgd_confusion(got: Rows, runs: Runs) -> None:
    want = Counter((r["label"], r["pred_sgd"]) for r in labelled(runs[1]))
    assert {(g["label"], g["predicted"]): g["n"] for g in got} == dict(want)


def check_common_mistakes(got: Rows, runs: Runs) -> None:
    want: Counter = Counter()
    for rows in runs.values():
        for r in labelled(rows):
            for p in PREDICTORS:
                if r[f"pred_{p}"] != r["label"]:
                    want[(p, r["label"], r[f"pred_{p}"])] += 1
    assert {(g["predictor"], g["label"], g["predicted"]): g["n"] for g in got} == dict(want)
    assert [g["n"] for g in got] == sorted((g["n"] for g in got), reverse=True)


def check_all_wrong(got: Rows, runs: Runs) -> None:
    want = sorted(
        r["path"]
        for r in labelled(runs[1])
        if all(r[f"pred_{p}"] != r["label"] for p in PREDICTORS)
    )
    assert [g["path"] for g in got] == want and want


def check_class_delta(got: Rows, runs: Runs) -> None:
    a, b = class_accuracy(runs[1]), class_accuracy(runs[2])
    assert {(g["predictor"], g["label"]) for g in got} == set(a)
    for g in got:
        key = (g["predictor"], g["label"])
        assert g["delta"] == pytest.approx(b[key][2] - a[key][2])
    assert any(g["delta"] < 0 for g in got if g["predictor"] == "sgd")  # the weak model


CHECKS: dict[str, Callable[[Rows, Runs], None]] = {
    "accuracy of each run": check_runs,
    "the images of run 1 the SGD model got wrong, least sure first": check_sgd_wrong,
    "images the three predictors disagree on": check_disagree,
    "why images failed": check_failures,
    "accuracy of each predictor on run 1": check_run_accuracy,
    "accuracy per class on run 1, worst first": check_class_accuracy,
    "the SGD model's confusion counts on run 1 (label = truth, predicted = its answer)": (
        check_sgd_confusion
    ),
    "the most common mistakes over all runs": check_common_mistakes,
    "images of run 1 that all three predictors got wrong": check_all_wrong,
    "per-class accuracy of run 2 against run 1 (positive delta: run 2 is better)": (
        check_class_delta
    ),
}


def _plain(value: Any) -> Any:
    """Driver types made comparable: Decimal (PostgreSQL numeric) as float, floats rounded."""
    if isinstance(value, Decimal):
        value = float(value)
    return round(value, 9) if isinstance(value, float) else value


def _run(url: str, statement: str) -> Rows:
    with get_engine(url).connect() as conn:
        result = conn.exec_driver_sql(statement)
        return [dict(zip(result.keys(), map(_plain, row), strict=True)) for row in result]


@pytest.mark.parametrize(("comment", "statement"), RECIPES, ids=[c for c, _ in RECIPES])
def test_sql_recipe_runs_on_both_databases_and_is_right(comment, statement, databases):
    assert comment in CHECKS, f"docs/usage.md recipe {comment!r} has no check in {__file__}"
    urls, runs = databases
    results = {name: _run(url, statement) for name, url in urls.items()}
    assert results["sqlite"], f"{comment!r} returned no rows"
    for got in results.values():
        CHECKS[comment](got, runs)
    # the same rows from both (column names of unnamed expressions differ: compare values)
    lite, pg = ([tuple(r.values()) for r in results[n]] for n in ("sqlite", "postgresql"))
    if re.search(r"ORDER BY", statement, flags=re.I) and "prob_sgd" not in statement:
        assert lite == pg
    else:  # no order, or an order whose ties may break either way
        assert sorted(lite, key=repr) == sorted(pg, key=repr)


def test_views_equal_python_on_every_run(databases):
    """The views themselves, not only the recipes' slices of them."""
    urls, runs = databases
    for url in urls.values():
        with get_engine(url).connect() as conn:
            rows = conn.execute(text("SELECT * FROM run_class_accuracy")).mappings().all()
            confusion = conn.execute(text("SELECT * FROM run_confusion")).mappings().all()
            outcomes = conn.execute(text("SELECT COUNT(*) FROM prediction_outcomes")).scalar()
            acc = conn.execute(text("SELECT * FROM run_accuracy")).mappings().all()
            cols = conn.execute(text("SELECT * FROM runs")).mappings().all()
        assert outcomes == 3 * sum(len(scored(r)) for r in runs.values())
        for run_id, run_rows in runs.items():
            want = class_accuracy(run_rows)
            got = {(r["predictor"], r["label"]): r for r in rows if r["run_id"] == run_id}
            assert set(got) == set(want)
            for key, (n, right, a) in want.items():
                assert (got[key]["n_images"], got[key]["n_correct"]) == (n, right)
                assert float(got[key]["accuracy"]) == pytest.approx(a)
            for p in PREDICTORS:
                pairs = Counter((r["label"], r[f"pred_{p}"]) for r in labelled(run_rows))
                got_pairs = {
                    (c["label"], c["predicted"]): c["n"]
                    for c in confusion
                    if c["run_id"] == run_id and c["predictor"] == p
                }
                assert got_pairs == dict(pairs)
                column = next(c for c in cols if c["id"] == run_id)[f"accuracy_{p}"]
                view = next(a for a in acc if a["run_id"] == run_id and a["predictor"] == p)
                assert float(view["accuracy"]) == pytest.approx(column)


def test_views_migration_goes_down_and_up_again(any_db_url):
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import inspect

    from db.session import MIGRATIONS

    engine = get_engine(any_db_url)
    views = {"prediction_outcomes", "run_accuracy", "run_class_accuracy", "run_confusion"}
    assert views <= set(inspect(engine).get_view_names())
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    for target in ("0001", "head"):
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            (command.downgrade if target == "0001" else command.upgrade)(cfg, target)
        names = set(inspect(engine).get_view_names())
        assert (names & views) == (set() if target == "0001" else views)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM run_confusion")).scalar() == 0
