"""Checks of a run's kept counts against SQL over its rows, shared by the tests of the
counts and of a batch stored twice."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, text

from core import defaults
from core.columns import PREDICTORS
from db import mistakes, queries, reads, views
from db.counts import PAIRS, PROB_BINS


def assert_counts_agree(engine: Engine, run_id: int) -> dict[str, Any]:
    """The run's kept counts against the views and a GROUP BY over its rows."""
    with engine.connect() as conn:
        counts = reads.confusion_counts(conn, run_id)
        assert counts == views.confusion(conn, run_id)

        def key(r: dict[str, Any]) -> tuple[str, str]:
            return r["predictor"], r.get("label", "")

        assert sorted(reads.class_accuracy(counts), key=key) == sorted(
            views.class_accuracy(conn, run_id), key=key
        )
        assert reads.run_accuracy(counts) == views.run_accuracy(conn, run_id)
        grouped = conn.execute(text(
            "SELECT error, COUNT(*) FROM predictions WHERE run_id = :r AND error IS NOT NULL "
            "GROUP BY error"), {"r": run_id}).all()
        reasons = reads.failure_reasons(conn, run_id)
        assert {r["error"]: r["n"] for r in reasons} == {e: int(n) for e, n in grouped}
        run = queries.get_run(conn, run_id)
        assert sum(r["n"] for r in reasons) == run["n_failed"]
        for p in PREDICTORS:  # the kept mistakes are the top of a sort of the run's rows
            kept = mistakes.confident_mistakes(conn, run_id, p, defaults.MISTAKES_KEPT)
            top = conn.execute(mistakes.scan_query(run_id, p, defaults.MISTAKES_KEPT)).mappings()
            assert kept == [dict(r) for r in top]
        unsure = mistakes.least_confident(conn, run_id, defaults.MISTAKES_KEPT)
        top = conn.execute(mistakes.unsure_scan_query(run_id, defaults.MISTAKES_KEPT)).mappings()
        assert unsure == [dict(r) for r in top]
        assert_summary_is_the_rows(conn, run_id)
        return counts


def assert_summary_is_the_rows(conn: Any, run_id: int) -> None:
    """The run's predicted classes, agreement and histogram summed over its batches
    (db.reads.run_summary) against SQL over its rows."""
    summary = reads.run_summary(conn, run_id)
    scored = "FROM predictions WHERE run_id = :r AND error IS NULL"
    for p in PREDICTORS:
        grouped = conn.execute(text(
            f"SELECT pred_{p}, COUNT(*) {scored} GROUP BY pred_{p}"), {"r": run_id}).all()
        assert summary.predicted[p] == {pred: int(n) for pred, n in grouped}
    same = {"agree": "pred_l1 = pred_l2 AND pred_l2 = pred_sgd",
            **{f"{a}_{b}": f"pred_{a} = pred_{b}" for a, b in PAIRS}}
    row = conn.execute(text(
        "SELECT COUNT(*), " + ", ".join(f"SUM(CASE WHEN {w} THEN 1 ELSE 0 END)"
                                        for w in same.values()) + f" {scored}"),
        {"r": run_id}).one()
    assert summary.scored == row[0]
    assert [summary.agree, *summary.agree_pairs.values()] == [int(n or 0) for n in row[1:]]
    assert list(summary.agree_pairs) == list(PAIRS)
    bins = conn.execute(text(
        "SELECT " + ", ".join(
            f"SUM(CASE WHEN prob_sgd * 10 >= {i} AND (prob_sgd * 10 < {i + 1} OR {i} = 9) "
            "THEN 1 ELSE 0 END)" for i in range(PROB_BINS)) + f" {scored}"),
        {"r": run_id}).one()
    assert summary.prob_bins == [int(n or 0) for n in bins]
