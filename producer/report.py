"""Building a run's report from the database, as a dict (for --json) and as text."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection

from db import queries


def _iso(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return (end - start).total_seconds()


def build_report(conn: Connection, run_id: int, max_failures: int = 20) -> dict[str, Any]:
    run = queries.get_run(conn, run_id)
    elapsed = _seconds(run["created_at"], run["finished_at"])
    done = run["n_scored"] + run["n_failed"]
    return {
        "run": {k: _iso(v) for k, v in run.items()},
        "accuracy": {p: run[f"accuracy_{p}"] for p in queries.PREDICTORS},
        "per_class": queries.per_class(conn, run_id),
        "failures": [
            {"path": p, "error": e} for p, e in queries.failures(conn, run_id, max_failures)
        ],
        "seconds": elapsed,
        "images_per_second": (done / elapsed) if elapsed else None,
    }


def printable(text: str) -> str:
    """A file name made safe for a terminal: control characters shown as escapes."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _pct(value: float | None) -> str:
    return "   n/a" if value is None else f"{100 * value:5.1f}%"


def format_report(report: dict[str, Any]) -> str:
    run = report["run"]
    lines = [
        f"run {run['id']}  status {run['status']}  model {run['model_id']}  "
        f"backend {run['backend']}",
        f"source     {printable(run['source_dir'])}",
        f"images     {run['n_images'] if run['n_images'] is not None else '?'}  "
        f"scored {run['n_scored']}  failed {run['n_failed']}  skipped (not images) "
        f"{run['n_skipped']}",
    ]
    if report["seconds"] is not None:
        rate = report["images_per_second"] or 0.0
        lines.append(f"time       {report['seconds']:.2f} s  ({rate:,.0f} images/s)")
    lines.append("")
    lines.append(f"{'class':<12}{'images':>8}{'L1':>9}{'L2':>9}{'SGD':>9}")
    for row in report["per_class"]:
        lines.append(
            f"{printable(str(row['label'])):<12}{row['n']:>8}{_pct(row['accuracy_l1']):>9}"
            f"{_pct(row['accuracy_l2']):>9}{_pct(row['accuracy_sgd']):>9}"
        )
    acc = report["accuracy"]
    n_labelled = sum(r["n"] for r in report["per_class"])
    lines.append(
        f"{'overall':<12}{n_labelled:>8}{_pct(acc['l1']):>9}{_pct(acc['l2']):>9}"
        f"{_pct(acc['sgd']):>9}"
    )
    if report["failures"]:
        lines.append("")
        lines.append(f"failures (first {len(report['failures'])}):")
        for f in report["failures"]:
            lines.append(f"  {printable(f['path'])}: {printable(f['error'])}")
    return "\n".join(lines)
