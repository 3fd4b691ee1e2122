"""Reads over the SQL views of migration 0002 (``run_accuracy``, ``run_class_accuracy``,
``run_confusion``) and over ``predictions`` for what changed between two runs.

The views are a public interface documented in docs/schema.md, for ad-hoc SQL; they
aggregate every row of a run, so reports read the kept counts instead (db/reads.py), and the
helpers over the views here let tests check that both give the same numbers.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, Select, case, column, func, or_, select, table, text

from core.columns import PREDICTORS
from db.models import predictions

run_accuracy_view = table(
    "run_accuracy",
    column("run_id"),
    column("predictor"),
    column("n_images"),
    column("n_correct"),
    column("accuracy"),
)
run_class_accuracy_view = table(
    "run_class_accuracy",
    column("run_id"),
    column("predictor"),
    column("label"),
    column("n_images"),
    column("n_correct"),
    column("accuracy"),
)
run_confusion_view = table(
    "run_confusion",
    column("run_id"),
    column("predictor"),
    column("label"),
    column("predicted"),
    column("n"),
)


def _typed(row: Any) -> dict[str, Any]:
    out = dict(row._mapping)
    for key in ("n_images", "n_correct", "n"):
        if key in out:
            out[key] = int(out[key])
    if "accuracy" in out:
        out["accuracy"] = float(out["accuracy"])
    return out


def run_accuracy(conn: Connection, run_id: int) -> list[dict[str, Any]]:
    """``{predictor, n_images, n_correct, accuracy}`` per predictor (only if labelled)."""
    v = run_accuracy_view.c
    rows = conn.execute(
        select(v.predictor, v.n_images, v.n_correct, v.accuracy)
        .where(v.run_id == run_id)
        .order_by(v.predictor)
    )
    return [_typed(r) for r in rows]


def class_accuracy(conn: Connection, run_id: int) -> list[dict[str, Any]]:
    """``{predictor, label, n_images, n_correct, accuracy}`` per predictor and class."""
    v = run_class_accuracy_view.c
    rows = conn.execute(
        select(v.predictor, v.label, v.n_images, v.n_correct, v.accuracy)
        .where(v.run_id == run_id)
        .order_by(v.predictor, v.label)
    )
    return [_typed(r) for r in rows]


def confusion(conn: Connection, run_id: int) -> dict[str, dict[str, dict[str, int]]]:
    """``{predictor: {label: {predicted: n}}}`` over the run's labelled, scored images."""
    v = run_confusion_view.c
    out: dict[str, dict[str, dict[str, int]]] = {p: {} for p in PREDICTORS}
    rows = conn.execute(select(v.predictor, v.label, v.predicted, v.n).where(v.run_id == run_id))
    for predictor, label, predicted, n in rows:
        out.setdefault(predictor, {}).setdefault(label, {})[predicted] = int(n)
    return out


def count_paths(conn: Connection, run_a: int, run_b: int) -> dict[str, int]:
    """Images (by path) in both runs, only in the first, only in the second."""
    row = conn.execute(
        text(
            "SELECT"
            " (SELECT COUNT(*) FROM predictions a WHERE a.run_id = :a AND EXISTS"
            "   (SELECT 1 FROM predictions b WHERE b.run_id = :b AND b.path = a.path)),"
            " (SELECT COUNT(*) FROM predictions WHERE run_id = :a),"
            " (SELECT COUNT(*) FROM predictions WHERE run_id = :b)"
        ),
        {"a": run_a, "b": run_b},
    ).one()
    both, n_a, n_b = (int(x) for x in row)
    return {"both": both, "only_a": n_a - both, "only_b": n_b - both}


def changed_query(run_a: int, run_b: int) -> Select[Any]:
    """Rows in path order; ``a`` is run A's side of the join. Both databases can walk run
    A's rows in the unique index on (run_id, path) and look each path up in run B, so with
    a LIMIT the query stops after that many changed rows instead of sorting the run."""
    a, b = predictions.alias("a"), predictions.alias("b")
    differs = [a.c[f"pred_{p}"].is_distinct_from(b.c[f"pred_{p}"]) for p in PREDICTORS]
    differs.append(a.c.error.is_distinct_from(b.c.error))
    return (
        select(
            a.c.path,
            a.c.label,
            *[a.c[f"pred_{p}"].label(f"a_{p}") for p in PREDICTORS],
            *[b.c[f"pred_{p}"].label(f"b_{p}") for p in PREDICTORS],
            a.c.error.label("a_error"),
            b.c.error.label("b_error"),
        )
        .join(b, (b.c.path == a.c.path) & (b.c.run_id == run_b))
        .where(a.c.run_id == run_a, or_(*differs))
        .order_by(a.c.path)
    )


def count_changed(conn: Connection, run_a: int, run_b: int) -> int:
    """How many images in both runs (by path) have any prediction or error that differs."""
    sub = changed_query(run_a, run_b).subquery()
    return int(conn.execute(select(func.count()).select_from(sub)).scalar_one())


def changed_predictions(
    conn: Connection, run_a: int, run_b: int, limit: int | None = None
) -> list[dict[str, Any]]:
    """Images in both runs (matched by path) whose prediction by any predictor, or whose
    error, differs; in path order. NULLs compare as values (``IS DISTINCT FROM``)."""
    query = changed_query(run_a, run_b)
    if limit is not None:
        query = query.limit(limit)
    return [dict(r) for r in conn.execute(query).mappings()]


def change_counts(conn: Connection, run_a: int, run_b: int) -> dict[str, dict[str, int]]:
    """Per predictor, over images scored in both runs (by path): how many predictions
    changed, and of the labelled ones how many went wrong -> right (fixed) and right ->
    wrong (broken)."""
    a, b = predictions.alias("a"), predictions.alias("b")
    label = a.c.label
    labelled = label.is_not(None)
    columns = []
    for p in PREDICTORS:
        pa, pb = a.c[f"pred_{p}"], b.c[f"pred_{p}"]
        columns += [
            func.sum(case((pa != pb, 1), else_=0)).label(f"{p}_changed"),
            func.sum(case((labelled & (pa != label) & (pb == label), 1), else_=0)).label(
                f"{p}_fixed"
            ),
            func.sum(case((labelled & (pa == label) & (pb != label), 1), else_=0)).label(
                f"{p}_broken"
            ),
        ]
    row = conn.execute(
        select(*columns)
        .select_from(a)
        .join(b, (b.c.path == a.c.path) & (b.c.run_id == run_b))
        .where(a.c.run_id == run_a, a.c.error.is_(None), b.c.error.is_(None))
    ).one()
    m = row._mapping
    return {
        p: {k: int(m[f"{p}_{k}"] or 0) for k in ("changed", "fixed", "broken")} for p in PREDICTORS
    }
