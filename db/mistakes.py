"""Each run keeps its ``MISTAKES_KEPT`` (core/defaults.py) most confident mistakes per
predictor (``run_mistakes``) and as many least confident scored images (``run_unsure``), so
that the HTML report's lists read a few rows instead of sorting the run.

A mistake is a scored, labelled row a predictor got wrong; the surest come first: smallest
``rank_key`` (the L1 or L2 distance to the wrong ideal image, or minus the SGD probability of
the wrong class: negating is exact, so the order is that of ``prob_sgd DESC``), then by path.
The least confident images are the scored rows of smallest ``prob_sgd``, then by path.

The transaction that stores a batch adds those of its rows that beat the list's
``MISTAKES_KEPT``-th entry as that transaction reads it, taking no lock: what another writer
adds meanwhile only makes that entry stricter, so every row of the true top goes in, and the
lists hold a superset of it while the run runs (reads take the first entries in order). When
the run is settled as done, :func:`trim_kept` cuts each list to ``MISTAKES_KEPT``.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Select, select, text

from core import defaults
from core.columns import PREDICTORS, SCORES, BatchColumns, batch_columns
from db.bulk import insert_rows
from db.models import predictions, run_mistakes, run_unsure

if TYPE_CHECKING:
    import numpy as np

#: Which rows are a predictor's mistakes, in SQL.
MISTAKE = "error IS NULL AND label IS NOT NULL AND pred_{p} <> label"

#: The column each predictor's rank key comes from, and its sign.
_RANK = {"l1": ("dist_l1", 1.0), "l2": ("dist_l2", 1.0), "sgd": ("prob_sgd", -1.0)}


def _mistakes(
    columns: BatchColumns, predictor: str, cut: float | None
) -> list[tuple[float, str]]:
    """``(rank_key, path)`` of the rows ``predictor`` got wrong whose key is no worse than
    ``cut``, at most the batch's own first ``MISTAKES_KEPT`` (a right answer fails the first
    test; an unscored row has no score)."""
    column, sign = _RANK[predictor]
    i = SCORES.index(column)
    labels = columns.label_codes
    wrong = (columns.has_score[i] & (labels >= 0)
             & (columns.answer_codes[PREDICTORS.index(predictor)] != labels))
    return _first_kept(columns, wrong, sign * columns.scores[i], cut)


def _first_kept(
    columns: BatchColumns, candidate: np.ndarray, keys: np.ndarray, cut: float | None
) -> list[tuple[float, str]]:
    """``(key, path)`` of the ``candidate`` rows whose key is no worse than ``cut``: their
    first ``MISTAKES_KEPT`` by key, then path. NumPy finds the ``MISTAKES_KEPT``-th key;
    only the rows up to it (ties included) are sorted in Python."""
    import numpy as np

    if cut is not None:
        candidate = candidate & (keys <= cut)
    where = np.flatnonzero(candidate)
    kept = defaults.MISTAKES_KEPT
    if len(where) > kept:
        last = np.partition(keys[where], kept - 1)[kept - 1]
        where = where[keys[where] <= last]
    found = [(key, columns.paths[j]) for key, j in zip(keys[where].tolist(), where.tolist(),
                                                       strict=True)]
    return heapq.nsmallest(kept, found) if len(found) > kept else found


#: The ``MISTAKES_KEPT``-th entry of each list, as ``m`` (the driver's parameter mark) binds.
_CUTS = (
    "SELECT "
    + ", ".join(
        f"(SELECT rank_key FROM run_mistakes WHERE run_id = {{m}} AND predictor = '{p}' "
        "ORDER BY rank_key LIMIT 1 OFFSET {m})" for p in PREDICTORS
    )
    + ", (SELECT prob_sgd FROM run_unsure WHERE run_id = {m} ORDER BY prob_sgd LIMIT 1 "
    "OFFSET {m})"
)
_MISTAKE_COLUMNS = {"run_id": "int", "predictor": "text", "path": "text", "rank_key": "float8"}
_UNSURE_COLUMNS = {"run_id": "int", "path": "text", "prob_sgd": "float8"}
#: a path kept already (its row deleted by hand and stored again) stays as it is
_KEEP_OLD = " ON CONFLICT DO NOTHING"


def keep_mistakes(conn: Connection, run_id: int, columns: BatchColumns) -> None:
    """Add a batch's rows (``columns``) to the run's kept lists: read each list's
    ``MISTAKES_KEPT``-th key (one statement of index look-ups), insert the batch's
    candidates no worse than it (one statement per table). The cut is applied first, so
    that after a run's first batches few rows are looked at twice."""
    m = "?" if conn.dialect.paramstyle == "qmark" else "%s"  # the driver's own
    *cuts, unsure_cut = conn.exec_driver_sql(
        _CUTS.format(m=m), (run_id, defaults.MISTAKES_KEPT - 1) * (len(PREDICTORS) + 1)
    ).one()
    added = []
    for p, cut in zip(PREDICTORS, cuts, strict=True):
        added += [(run_id, p, path, key) for key, path in _mistakes(columns, p, cut)]
    insert_rows(conn, "run_mistakes", _MISTAKE_COLUMNS, added, _KEEP_OLD)
    unsure = _first_kept(columns, columns.has_score[2], columns.scores[2], unsure_cut)
    insert_rows(conn, "run_unsure", _UNSURE_COLUMNS,
                [(run_id, path, key) for key, path in unsure], _KEEP_OLD)


def batch_candidates(
    columns: BatchColumns,
) -> tuple[list[tuple[str, str, float]], list[tuple[str, float]]]:
    """A batch's own first ``MISTAKES_KEPT`` mistakes per predictor, as ``(predictor, path,
    rank_key)``, and least confident images, as ``(path, prob_sgd)``: what it may add to
    the run's lists, for a statement that applies each list's cut itself
    (db/counts.write_tallies)."""
    mistakes = [(p, path, key) for p in PREDICTORS for key, path in _mistakes(columns, p, None)]
    unsure = _first_kept(columns, columns.has_score[2], columns.scores[2], None)
    return mistakes, [(path, key) for key, path in unsure]


def refill_kept(conn: Connection, run_id: int) -> None:
    """Keep again the run's first ``MISTAKES_KEPT`` per list from its rows (a sort of the
    run's mistakes each): after entries were deleted from a list that may have been cut
    (:func:`trim_kept`), the rows that were cut out may belong in it again. Only a batch
    stored twice (``producer resume --retry-failed``) whose first rows had kept entries
    needs it."""
    kept = defaults.MISTAKES_KEPT
    rows: list[Any] = []
    for p in PREDICTORS:
        rows += conn.execute(scan_query(run_id, p, kept)).mappings().all()
    rows += conn.execute(unsure_scan_query(run_id, kept)).mappings().all()
    keep_mistakes(conn, run_id, batch_columns([{**r, "error": None} for r in rows]))


_TRIM_MISTAKES = (
    "DELETE FROM run_mistakes WHERE run_id = {m} AND predictor = {m} AND (rank_key, path) > "
    "(SELECT rank_key, path FROM run_mistakes WHERE run_id = {m} AND predictor = {m} "
    "ORDER BY rank_key, path LIMIT 1 OFFSET {m})"
)
_TRIM_UNSURE = (
    "DELETE FROM run_unsure WHERE run_id = {m} AND (prob_sgd, path) > "
    "(SELECT prob_sgd, path FROM run_unsure WHERE run_id = {m} "
    "ORDER BY prob_sgd, path LIMIT 1 OFFSET {m})"
)


def trim_kept(conn: Connection, run_id: int) -> None:
    """Cut each of a finished run's lists to its first ``MISTAKES_KEPT`` entries (in the
    database's own collation of paths, the order every read uses)."""
    m = "?" if conn.dialect.paramstyle == "qmark" else "%s"
    last = defaults.MISTAKES_KEPT - 1
    for p in PREDICTORS:
        conn.exec_driver_sql(_TRIM_MISTAKES.format(m=m), (run_id, p, run_id, p, last))
    conn.exec_driver_sql(_TRIM_UNSURE.format(m=m), (run_id, run_id, last))


_COLUMNS = (
    predictions.c.path,
    predictions.c.label,
    predictions.c.pred_l1,
    predictions.c.pred_l2,
    predictions.c.pred_sgd,
    predictions.c.dist_l1,
    predictions.c.dist_l2,
    predictions.c.prob_sgd,
)


def kept_query(run_id: int, predictor: str, limit: int) -> Select[*tuple[Any, ...]]:
    """The paths of the first ``limit`` kept mistakes, surest first: a walk of the first
    entries of ``ix_run_mistakes_rank`` for the run and predictor."""
    m = run_mistakes.c
    return (
        select(m.path)
        .where(m.run_id == run_id, m.predictor == predictor)
        .order_by(m.rank_key, m.path)
        .limit(limit)
    )


def rows_query(run_id: int, paths: Sequence[str]) -> Select[*tuple[Any, ...]]:
    """The rows of ``paths`` in the run, each found by the unique index on (run_id, path)."""
    return select(*_COLUMNS).where(predictions.c.run_id == run_id, predictions.c.path.in_(paths))


def scan_query(run_id: int, predictor: str, limit: int) -> Select[*tuple[Any, ...]]:
    """The same list from ``predictions`` itself (a sort of the run's mistakes), for more
    than ``MISTAKES_KEPT``; also the definition the kept ones are tested against."""
    column, sign = _RANK[predictor]
    score = predictions.c[column]
    return (
        select(*_COLUMNS)
        .where(predictions.c.run_id == run_id, text(MISTAKE.format(p=predictor)))
        .order_by(score.asc() if sign > 0 else score.desc(), predictions.c.path)
        .limit(limit)
    )


def confident_mistakes(
    conn: Connection, run_id: int, predictor: str, limit: int
) -> list[dict[str, Any]]:
    """The labelled images ``predictor`` got wrong, surest first: highest SGD probability,
    or smallest L1/L2 distance to the (wrong) ideal image it chose; then by path.

    Up to ``MISTAKES_KEPT``, two bounded reads: the kept paths, then their rows by path (two
    statements rather than a join, which PostgreSQL may plan as a merge join over every row
    of the run)."""
    if limit > defaults.MISTAKES_KEPT:
        return [dict(r) for r in conn.execute(scan_query(run_id, predictor, limit)).mappings()]
    paths = list(conn.execute(kept_query(run_id, predictor, limit)).scalars())
    rows = {r["path"]: dict(r) for r in conn.execute(rows_query(run_id, paths)).mappings()}
    return [rows[p] for p in paths if p in rows]  # a row deleted by hand is left out



def unsure_query(run_id: int, limit: int) -> Select[*tuple[Any, ...]]:
    """The paths of the run's first ``limit`` least confident images: a walk of the first
    entries of ``ix_run_unsure_rank``."""
    u = run_unsure.c
    return (
        select(u.path).where(u.run_id == run_id).order_by(u.prob_sgd, u.path).limit(limit)
    )


def unsure_scan_query(run_id: int, limit: int) -> Select[*tuple[Any, ...]]:
    """The same list from ``predictions`` itself, for more than ``MISTAKES_KEPT``; also the
    definition the kept ones are tested against."""
    return (
        select(*_COLUMNS)
        .where(predictions.c.run_id == run_id, predictions.c.prob_sgd.is_not(None))
        .order_by(predictions.c.prob_sgd, predictions.c.path)
        .limit(limit)
    )


def least_confident(conn: Connection, run_id: int, limit: int) -> list[dict[str, Any]]:
    """The run's scored images of smallest ``prob_sgd`` (labelled or not), then by path: up
    to ``MISTAKES_KEPT`` read from ``run_unsure`` and their rows by path, as
    :func:`confident_mistakes` does."""
    if limit > defaults.MISTAKES_KEPT:
        return [dict(r) for r in conn.execute(unsure_scan_query(run_id, limit)).mappings()]
    paths = list(conn.execute(unsure_query(run_id, limit)).scalars())
    rows = {r["path"]: dict(r) for r in conn.execute(rows_query(run_id, paths)).mappings()}
    return [rows[p] for p in paths if p in rows]
