"""Comparing two runs: accuracy deltas per predictor and class, and the images (matched by
their path relative to each run's source directory) whose prediction changed.

Accuracies come from each run's confusion counts (``run_counts``, equal to the
``run_accuracy`` and ``run_class_accuracy`` views); a delta is ``B - A``, so a positive delta
means run B is better. The changed images are read in path order through the unique index on
(run_id, path), and the query stops after ``limit`` of them.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection

from core.text import plural, printable
from db import queries, reads, views
from producer.report import NAMES
from producer.tables import format_table, pct

RUN_FIELDS = ("id", "model_id", "source_dir", "status", "n_scored", "n_failed")


def _delta(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else b - a


def _side_by_side(rows_a: list[dict], rows_b: list[dict], key: tuple[str, ...]) -> list[dict]:
    index_a = {tuple(r[k] for k in key): r for r in rows_a}
    index_b = {tuple(r[k] for k in key): r for r in rows_b}
    out = []
    for k in sorted(index_a.keys() | index_b.keys()):
        ra, rb = index_a.get(k), index_b.get(k)
        acc_a = ra["accuracy"] if ra else None
        acc_b = rb["accuracy"] if rb else None
        out.append(
            {
                **dict(zip(key, k, strict=True)),
                "n_a": ra["n_images"] if ra else 0,
                "n_b": rb["n_images"] if rb else 0,
                "accuracy_a": acc_a,
                "accuracy_b": acc_b,
                "delta": _delta(acc_a, acc_b),
            }
        )
    return out


def compare_runs(conn: Connection, run_a: int, run_b: int, limit: int = 50) -> dict[str, Any]:
    """Everything ``producer compare`` shows, as one JSON-ready dict."""
    a, b = queries.get_run(conn, run_a), queries.get_run(conn, run_b)
    counts_a, counts_b = reads.confusion_counts(conn, run_a), reads.confusion_counts(conn, run_b)
    paths = views.count_paths(conn, run_a, run_b)
    return {
        "run_a": {k: a[k] for k in RUN_FIELDS},
        "run_b": {k: b[k] for k in RUN_FIELDS},
        "paths": paths,
        # no image in both: the runs scored different images, so only their accuracies
        # stand side by side, and no prediction can have changed
        "disjoint": paths["both"] == 0,
        "accuracy": _side_by_side(
            reads.run_accuracy(counts_a), reads.run_accuracy(counts_b), ("predictor",)
        ),
        "per_class": _side_by_side(
            reads.class_accuracy(counts_a),
            reads.class_accuracy(counts_b),
            ("predictor", "label"),
        ),
        "changes": views.change_counts(conn, run_a, run_b),
        "n_changed": views.count_changed(conn, run_a, run_b),
        "changed": views.changed_predictions(conn, run_a, run_b, limit),
    }


def _signed(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:+.1f}"


def _transition(before: Any, after: Any) -> str:
    before = "error" if before is None else before
    after = "error" if after is None else after
    return str(before) if before == after else f"{before}->{after}"


def format_comparison(c: dict[str, Any]) -> str:
    a, b, paths = c["run_a"], c["run_b"], c["paths"]
    lines = [
        f"A: run {a['id']} (model {a['model_id']}, {printable(a['source_dir'])})",
        f"B: run {b['id']} (model {b['model_id']}, {printable(b['source_dir'])})",
        f"images by path: {paths['both']:,} in both, {paths['only_a']:,} only in A, "
        f"{paths['only_b']:,} only in B",
        "",
    ]
    if c["disjoint"]:
        return "\n".join([*lines, _disjoint(c)])
    rows: list[list[Any]] = []
    by_predictor = {r["predictor"]: r for r in c["accuracy"]}
    for p, name in NAMES.items():
        for r in (x for x in c["per_class"] if x["predictor"] == p):
            rows.append(_accuracy_row(name, r["label"], r))
        if p in by_predictor:
            rows.append(_accuracy_row(name, "overall", by_predictor[p]))
    headers = ["predictor", "class", "images A", "images B", "A", "B", "delta (points)"]
    lines.append(format_table(headers, rows, "llrrrrr"))
    lines.append("")
    for p, name in NAMES.items():
        ch = c["changes"][p]
        lines.append(
            f"{name}: {plural(ch['changed'], 'prediction')} changed; {ch['fixed']:,} wrong in A "
            f"right in B, {ch['broken']:,} right in A wrong in B"
        )
    if c["changed"]:
        lines.append("")
        lines.append(
            f"images whose prediction changed (first {len(c['changed'])} of {c['n_changed']}):"
        )
        changed = [
            [
                r["path"],
                r["label"] or "",
                *(_transition(r[f"a_{p}"], r[f"b_{p}"]) for p in NAMES),
            ]
            for r in c["changed"]
        ]
        lines.append(format_table(["path", "label", *NAMES.values()], changed, "lllll"))
    else:
        lines.append("no image's prediction changed")
    return "\n".join(lines)


def _accuracy_row(name: str, label: str, r: dict[str, Any]) -> list[Any]:
    return [
        name,
        label,
        r["n_a"],
        r["n_b"],
        pct(r["accuracy_a"]),
        pct(r["accuracy_b"]),
        _signed(r["delta"]),
    ]


def _disjoint(c: dict[str, Any]) -> str:
    """The text of two runs with no image in common: each run's overall accuracy, and why
    nothing more compares (per-class deltas and changed predictions need the same images)."""
    rows = []
    for p, name in NAMES.items():
        r = next((x for x in c["accuracy"] if x["predictor"] == p), None)
        if r is not None:
            rows.append([name, r["n_a"], r["n_b"], pct(r["accuracy_a"]), pct(r["accuracy_b"])])
    note = (
        "no image is in both runs (images are matched by their path in each run's "
        "directory): they scored different images, so only their accuracies are shown"
    )
    if not rows:
        return f"{note}; neither has labelled images"
    table = format_table(["predictor", "images A", "images B", "A", "B"], rows, "lrrrr")
    return f"{note}\n\n{table}"
