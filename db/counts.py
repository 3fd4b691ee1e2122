"""What a batch's rows count, kept per batch: the numbers on its ``batches`` row (scored,
failed, labelled, right per predictor, how often the predictors agree, a histogram of
``prob_sgd``), its cells in ``batch_counts`` (per predictor, label and answer, unlabelled
rows too) and its failure reasons in ``batch_failures``.

They are written by the transaction that stores the batch's rows and marks it done
(:func:`db.batch_life.store_batch`), and no other batch touches them, so writers of one
run never wait for each other here; a run's counts are their sums (the views ``run_totals``,
``run_counts`` and ``run_failures``; db/reads.py), exact at every commit.

:func:`write_tallies` writes them with the batch's entries in the run's kept lists
(``run_mistakes``, ``run_unsure``; db/mistakes.py) and reads the run's state back (which
says whether to settle it). On PostgreSQL all of it is one statement of fixed text
(data-modifying ``WITH`` clauses over arrays, prepared once by the driver, its parameters
sent in binary, which the driver makes in half the time of text), which claims the batch
too (db/batch_life.write_batch) and is sent before its rows' COPY: one round trip to the
server instead of seven, which is what those small writes cost a writer on a busy server.
Each kept list's cut is read by the same statement, before its inserts, as the statements
it replaces read it. On SQLite, where a statement costs no round trip, they are separate
statements (the cells, the failure reasons, then :func:`db.mistakes.keep_mistakes`).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, select

from core import defaults
from core.columns import PREDICTORS, BatchColumns
from db.bulk import insert_rows
from db.mistakes import batch_candidates, keep_mistakes
from db.models import runs

#: Bins of the ``prob_sgd`` histogram: bin i holds i/10 <= p < (i+1)/10, and 1.0 the last.
PROB_BINS = 10

#: The pairs of predictors whose agreement is counted, as ``n_agree_<a>_<b>`` names them.
PAIRS = (("l1", "l2"), ("l1", "sgd"), ("l2", "sgd"))


@dataclass(frozen=True)
class RowCounts:
    """What a set of prediction rows counts."""

    scored: int = 0
    failed: int = 0
    labelled: int = 0  # scored, with a label
    correct: tuple[int, int, int] = (0, 0, 0)  # of those, right by l1, l2, sgd
    agree: int = 0  # scored rows where all three predictors give the same answer
    agree_pairs: tuple[int, int, int] = (0, 0, 0)  # ... where each pair of :data:`PAIRS` does
    prob_bins: tuple[int, ...] = (0,) * PROB_BINS  # scored rows per tenth of prob_sgd
    #: (predictor, label or None, predicted) -> scored rows: what ``batch_counts`` holds
    cells: dict[tuple[str, str | None, str], int] = field(default_factory=dict)
    #: error -> failed rows: what ``batch_failures`` holds
    failures: dict[str, int] = field(default_factory=dict)

    def batch_values(self) -> dict[str, Any]:
        """The batch's columns of these counts, as ``batches`` names them."""
        values: dict[str, Any] = {
            "n_scored": self.scored, "n_failed": self.failed, "n_labelled": self.labelled,
            "n_agree": self.agree, "prob_sgd_bins": list(self.prob_bins),
        }
        for p, n in zip(PREDICTORS, self.correct, strict=True):
            values[f"n_correct_{p}"] = n
        for (a, b), n in zip(PAIRS, self.agree_pairs, strict=True):
            values[f"n_agree_{a}_{b}"] = n
        return values


def count_rows(columns: BatchColumns) -> RowCounts:
    """The counts of a batch's rows (``columns``). A row is scored when it has no error, and
    then has every prediction; an unscored row has none (see core/columns.py). The failure
    reasons are a ``Counter`` of the error column (a loop in C); everything else is NumPy
    over the label and answer codes, one ``bincount`` of (label, answer) per predictor, and
    one of the ``prob_sgd`` column's tenths."""
    import numpy as np

    errors = Counter(columns.errors)
    scored = errors.pop(None, 0)
    codes = columns.answer_codes
    answered = (codes >= 0).all(axis=0)
    answers, labels = codes[:, answered], columns.label_codes[answered]
    k = len(columns.classes)
    cells: dict[tuple[str, str | None, str], int] = {}
    names: list[str | None] = [None, *columns.classes]  # label code + 1
    for p, predicted in zip(PREDICTORS, answers, strict=True):
        found = np.bincount((labels + 1) * k + predicted, minlength=(k + 1) * k)
        for cell in np.flatnonzero(found).tolist():
            cells[(p, names[cell // k], columns.classes[cell % k])] = int(found[cell])
    l1, l2, sgd = answers
    right = [int(np.count_nonzero(a == labels)) for a in answers]
    pairs = [int(np.count_nonzero(a == b)) for a, b in ((l1, l2), (l1, sgd), (l2, sgd))]
    probs = columns.scores[2][columns.has_score[2]]  # bin i: floor(p * 10) = i, 1.0 the last
    bins = np.bincount(np.minimum((probs * PROB_BINS).astype(np.int64), PROB_BINS - 1),
                       minlength=PROB_BINS)
    return RowCounts(
        scored, len(columns.paths) - scored, int(np.count_nonzero(labels >= 0)),
        (right[0], right[1], right[2]), int(np.count_nonzero((l1 == l2) & (l2 == sgd))),
        (pairs[0], pairs[1], pairs[2]), tuple(int(n) for n in bins), cells,
        {str(e): n for e, n in errors.items()},
    )


_CELL_COLUMNS = {
    "run_id": "int", "batch_seq": "int", "predictor": "text", "label": "text",
    "predicted": "text", "n": "int",
}
_FAILURE_COLUMNS = {"run_id": "int", "batch_seq": "int", "error": "text", "n": "int"}


#: The batch's claim, as db/batch_life.write_batch makes it on SQLite: its row alone locked
#: to the commit, if it is queued and was never stored, its counts written; ``go`` holds one
#: row if the statement is to write the rest (it claimed, or was not to claim).
_CLAIM = (
    "claimed AS (UPDATE batches SET status = %(status)b, finished_at = %(now)b, "
    "deliveries = deliveries + %(deliveries)b::int, prob_sgd_bins = %(prob_sgd_bins)s::json, "
    + ", ".join(f"{name} = %({name})b::int"
                for name in RowCounts().batch_values() if name != "prob_sgd_bins")
    + " WHERE run_id = %(r)b AND seq = %(s)b AND status = 'queued' "
    "AND prob_sgd_bins IS NULL AND %(claim)b RETURNING 1), "
    "go AS (SELECT FROM claimed UNION ALL SELECT WHERE NOT %(claim)b), "
)
_ALL = (
    "WITH " + _CLAIM
    + "cells AS (INSERT INTO batch_counts (run_id, batch_seq, predictor, label, predicted, n) "
    "SELECT %(r)b, %(s)b, * FROM unnest(%(cell_p)b::text[], %(cell_label)b::text[], "
    "%(cell_pred)b::text[], %(cell_n)b::int[]) WHERE EXISTS (SELECT FROM go)), "
    "failures AS (INSERT INTO batch_failures (run_id, batch_seq, error, n) "
    "SELECT %(r)b, %(s)b, * FROM unnest(%(fail_error)b::text[], %(fail_n)b::int[]) "
    "WHERE EXISTS (SELECT FROM go)), "
    "cuts AS MATERIALIZED (SELECT p AS predictor, (SELECT k.rank_key FROM run_mistakes k "
    "WHERE k.run_id = %(r)b AND k.predictor = p ORDER BY k.rank_key LIMIT 1 OFFSET %(last)b) "
    "AS cut FROM unnest(%(predictors)b::text[]) AS p), "
    "mistakes AS (INSERT INTO run_mistakes (run_id, predictor, path, rank_key) "
    "SELECT %(r)b, v.predictor, v.path, v.rank_key FROM unnest(%(m_p)b::text[], "
    "%(m_path)b::text[], %(m_key)b::float8[]) AS v(predictor, path, rank_key) "
    "JOIN cuts USING (predictor) WHERE (cuts.cut IS NULL OR v.rank_key <= cuts.cut) "
    "AND EXISTS (SELECT FROM go) ON CONFLICT DO NOTHING), "
    "unsure AS (INSERT INTO run_unsure (run_id, path, prob_sgd) "
    "SELECT %(r)b, v.path, v.prob FROM unnest(%(u_path)b::text[], %(u_prob)b::float8[]) "
    "AS v(path, prob) WHERE v.prob <= COALESCE((SELECT k.prob_sgd FROM run_unsure k "
    "WHERE k.run_id = %(r)b ORDER BY k.prob_sgd LIMIT 1 OFFSET %(last)b), 'Infinity') "
    "AND EXISTS (SELECT FROM go) ON CONFLICT DO NOTHING) "
    "SELECT EXISTS (SELECT FROM go), status, n_images FROM runs WHERE id = %(r)b"
)


def write_tallies(
    conn: Connection, run_id: int, seq: int, counts: RowCounts, columns: BatchColumns,
    claim: dict[str, Any] | None = None,
) -> tuple[str, int | None] | None:
    """Write batch ``seq``'s counts and kept-list entries in the caller's transaction;
    return the run's status and ``n_images`` as that transaction sees them.

    With ``claim`` (the batch's new ``status``, its ``now`` and the ``deliveries`` to add;
    PostgreSQL only), the same statement first claims the batch with these counts, if it is
    queued and was never stored, and writes nothing, returning ``None``, if it is not."""
    if conn.dialect.name != "postgresql":
        assert claim is None, "SQLite's claim is write_batch's"
        # one statement per table (a batch of ten classes has at most 330 cells)
        insert_rows(conn, "batch_counts", _CELL_COLUMNS,
                    [(run_id, seq, *cell, n) for cell, n in counts.cells.items()])
        insert_rows(conn, "batch_failures", _FAILURE_COLUMNS,
                    [(run_id, seq, error, n) for error, n in counts.failures.items()])
        keep_mistakes(conn, run_id, columns)
        run = conn.execute(
            select(runs.c.status, runs.c.n_images).where(runs.c.id == run_id)).one()
        return str(run.status), run.n_images
    cells = list(counts.cells.items())
    mistakes, unsure = batch_candidates(columns)
    values = counts.batch_values()
    claimed, status, n_images = conn.exec_driver_sql(_ALL, {
        "r": run_id, "s": seq, "last": defaults.MISTAKES_KEPT - 1,
        # without a claim its parameters are still sent (the text is fixed), and unused
        "claim": claim is not None, **(claim or {"status": "", "now": None, "deliveries": 0}),
        "prob_sgd_bins": json.dumps(values.pop("prob_sgd_bins")), **values,
        "predictors": list(PREDICTORS),
        "cell_p": [p for (p, _, _), _ in cells], "cell_label": [lab for (_, lab, _), _ in cells],
        "cell_pred": [q for (_, _, q), _ in cells], "cell_n": [n for _, n in cells],
        "fail_error": list(counts.failures), "fail_n": list(counts.failures.values()),
        "m_p": [p for p, _, _ in mistakes], "m_path": [path for _, path, _ in mistakes],
        "m_key": [key for _, _, key in mistakes],
        "u_path": [path for path, _ in unsure], "u_prob": [key for _, key in unsure],
    }).one()
    return (str(status), n_images) if claimed else None
