"""Building a run's report from the database, as a dict (for --json) and as text.

Accuracies per class and the confusion matrices follow from the run's confusion counts, and
the failure reasons from its failure counts (``run_counts``, ``run_failures``: kept by each
batch's commit), so a report reads the same few hundred numbers however many images the run
has. They equal what the SQL views of migration 0002 give (``SELECT ... FROM
run_class_accuracy``); tests check that they do.
"""

from __future__ import annotations

import statistics
from datetime import datetime
from typing import Any

from sqlalchemy import Connection

from core.columns import PREDICTORS
from core.errors import DigitscoreError
from core.text import printable
from db import queries, reads
from producer.predictions import NAMES, build_predictions, format_predictions
from producer.tables import format_table, pct


def _iso(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return (end - start).total_seconds()


def _rate(n: int, seconds: float | None) -> float | None:
    return n / seconds if seconds else None


def _batch_stats(rows: list[Any]) -> dict[str, Any]:
    latencies = [s for r in rows if (s := _seconds(r.enqueued_at, r.finished_at)) is not None]
    return {
        "n_batches": len(rows),
        "n_done": sum(r.status == "done" for r in rows),
        "n_redelivered": sum((r.deliveries or 0) > 1 for r in rows),
        "median_seconds": statistics.median(latencies) if latencies else None,
        "max_seconds": max(latencies) if latencies else None,
    }


def _confusion_matrix(cells: dict[str, dict[str, int]], classes: list[str]) -> list[list[int]]:
    """Rows: true label, columns: predicted, both in ``classes`` order."""
    return [[cells.get(label, {}).get(pred, 0) for pred in classes] for label in classes]


def _timings(run: dict[str, Any]) -> dict[str, Any]:
    """Seconds between the run's timestamps; throughput is over the whole run."""
    total = _seconds(run["created_at"], run["finished_at"])
    return {
        "sending_seconds": _seconds(run["created_at"], run["submitted_at"]),
        "first_result_seconds": _seconds(run["created_at"], run["started_at"]),
        "first_to_last_result_seconds": _seconds(run["started_at"], run["finished_at"]),
        "total_seconds": total,
        "images_per_second": _rate(run["n_scored"] + run["n_failed"], total),
    }


def build_report(conn: Connection, run_id: int, max_failures: int = 20) -> dict[str, Any]:
    run = queries.get_run(conn, run_id)
    confusion = reads.confusion_counts(conn, run_id)
    model_problem = None
    try:
        classes = reads.model_classes(conn, run["model_id"])
    except DigitscoreError as e:  # the run's rows still report; its classes are their labels
        model_problem = str(e)
        classes = sorted({label for p in confusion.values() for label in p})
    per_predictor_class = reads.class_accuracy(confusion)
    labels = sorted({r["label"] for r in per_predictor_class}, key=_class_order(classes))
    per_class = []
    for label in labels:
        row: dict[str, Any] = {"label": label}
        for r in per_predictor_class:
            if r["label"] == label:
                row["n"] = r["n_images"]
                row[f"accuracy_{r['predictor']}"] = r["accuracy"]
        per_class.append(row)
    # the run's counts, kept by every batch's commit, rather than a pass over its rows
    predictors = {
        p: {
            "accuracy": run[f"accuracy_{p}"],
            "n_images": int(run["n_labelled"]),
            "n_correct": int(run[f"n_correct_{p}"]),
            "confusion": _confusion_matrix(confusion.get(p, {}), classes),
        }
        for p in PREDICTORS
    }
    timings = _timings(run)
    n_labelled = predictors["sgd"]["n_images"]
    return {
        "predictions": build_predictions(conn, run_id, classes, n_labelled),
        "run": {k: _iso(v) for k, v in run.items()},
        "model_problem": model_problem,
        "classes": classes,
        "accuracy": {p: run[f"accuracy_{p}"] for p in PREDICTORS},
        "per_class": per_class,
        "predictors": predictors,
        "counts": {
            "images": run["n_images"],
            "scored": run["n_scored"],
            "failed": run["n_failed"],
            "skipped": run["n_skipped"],
            "labelled": n_labelled,
            "unlabelled": run["n_scored"] - n_labelled,
        },
        "timings": timings,
        "batches": _batch_stats(reads.batch_timings(conn, run_id)),
        "failure_reasons": reads.failure_reasons(conn, run_id),
        "failures": [
            {"path": p, "error": e} for p, e in queries.failures(conn, run_id, max_failures)
        ],
        "seconds": timings["total_seconds"],
        "images_per_second": timings["images_per_second"],
    }


def _class_order(classes: list[str]) -> Any:
    index = {c: i for i, c in enumerate(classes)}
    return lambda label: (index.get(label, len(index)), label)


def _secs(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} s"


def _per_s(value: float | None) -> str:
    return "" if value is None else f" ({value:,.0f} images/s)"


def format_confusion(classes: list[str], matrix: list[list[int]]) -> str:
    headers = ["label \\ predicted", *classes]
    rows = [[label, *counts] for label, counts in zip(classes, matrix, strict=True)]
    return format_table(headers, rows, "l" + "r" * len(classes))


def format_report(report: dict[str, Any]) -> str:
    run, counts, t, b = report["run"], report["counts"], report["timings"], report["batches"]
    lines = [
        f"run {run['id']}  status {run['status']}  model {run['model_id']}  "
        f"backend {run['backend']}",
        *([f"model      {report['model_problem']}"] if report.get("model_problem") else []),
        f"source     {printable(run['source_dir'])}",
        f"images     {counts['images'] if counts['images'] is not None else '?'}  "
        f"scored {counts['scored']}  failed {counts['failed']}  skipped (not images) "
        f"{counts['skipped']}  labelled {counts['labelled']}",
    ]
    if t["total_seconds"] is not None:
        lines.append(f"time       {_secs(t['total_seconds'])}{_per_s(t['images_per_second'])}")
    lines.append(
        f"phases     sending {_secs(t['sending_seconds'])}, first result after "
        f"{_secs(t['first_result_seconds'])}, first to last result "
        f"{_secs(t['first_to_last_result_seconds'])}"
    )
    lines.append(
        f"batches    {b['n_batches']} ({b['n_done']} done, {b['n_redelivered']} redelivered); "
        f"sent to stored: median {_secs(b['median_seconds'])}, max {_secs(b['max_seconds'])}"
    )
    predicted = format_predictions(report["predictions"])
    if predicted:
        lines += ["", *predicted]
    lines.append("")
    if report["predictions"]["unlabelled"]:
        lines.append(report["predictions"]["unlabelled"])
    else:
        lines.append(_accuracy_table(report))
    if counts["labelled"]:
        for p, name in NAMES.items():
            lines.append("")
            lines.append(f"confusion matrix, {name} (rows: label, columns: predicted)")
            lines.append(format_confusion(report["classes"], report["predictors"][p]["confusion"]))
    if report["failures"]:
        lines.append("")
        lines.append(f"failures (first {len(report['failures'])} of {counts['failed']}):")
        for f in report["failures"]:
            lines.append(f"  {printable(f['path'])}: {printable(f['error'])}")
        lines.append("failure reasons:")
        reasons = [[r["n"], r["error"]] for r in report["failure_reasons"]]
        lines.append(format_table(["n", "error"], reasons, "rl"))
    return "\n".join(lines)


def _accuracy_table(report: dict[str, Any]) -> str:
    rows: list[list[Any]] = [
        [row["label"], row["n"], *(pct(row.get(f"accuracy_{p}")) for p in NAMES)]
        for row in report["per_class"]
    ]
    acc = report["accuracy"]
    rows.append(["overall", report["counts"]["labelled"], *(pct(acc[p]) for p in NAMES)])
    return format_table(["class", "images", *NAMES.values()], rows, "lrrrr")
