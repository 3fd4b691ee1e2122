"""Each run keeps its ``MISTAKES_KEPT`` most confident mistakes per predictor (``run_mistakes``),
so that the HTML report's "most confidently misclassified" lists read a few rows instead of
sorting the run.

A mistake is a scored, labelled row a predictor got wrong; the surest come first: smallest
``rank_key`` (the L1 or L2 distance to the wrong ideal image, or minus the SGD probability of
the wrong class: negating is exact, so the order is that of ``prob_sgd DESC``), then by path.
The transaction that stores a batch adds the batch's new rows that beat the run's
``MISTAKES_KEPT``-th kept mistake and removes those pushed beyond it: a few statements per batch
whatever the run's size. (A partial index on ``predictions`` ordered by confidence would
serve the reads too, but a batch's entries land all over such an index, so each batch would
rewrite pages of it in proportion to the run's size.)
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, Select, select, text

from core import defaults
from core.rows import PredictionRow
from db.counts import insert_rows
from db.models import predictions, run_mistakes

#: Which rows are a predictor's mistakes, in SQL.
MISTAKE = "error IS NULL AND label IS NOT NULL AND pred_{p} <> label"

#: The column each predictor's rank key comes from, and its sign.
_RANK = {"l1": ("dist_l1", 1.0), "l2": ("dist_l2", 1.0), "sgd": ("prob_sgd", -1.0)}


def batch_mistakes(rows: Sequence[PredictionRow]) -> dict[str, list[tuple[float, str]]]:
    """``(rank_key, path)`` of the rows each predictor got wrong, in no particular order (a
    right answer fails the first test; an unscored row has no prediction and no score)."""
    out = {}
    for p, (column, sign) in _RANK.items():
        predicted = f"pred_{p}"
        out[p] = [
            (sign * r[column], r["path"])  # type: ignore[literal-required]
            for r in rows
            if r[predicted] != r["label"]  # type: ignore[literal-required]
            and r["label"] is not None and r[column] is not None  # type: ignore[literal-required]
        ]
    return out


_KEPT_NOW = "SELECT predictor, rank_key FROM run_mistakes WHERE run_id = {m}"
_COLUMNS_TYPES = {"run_id": "int", "predictor": "text", "path": "text", "rank_key": "float8"}
_DROP = "DELETE FROM run_mistakes WHERE run_id = {m} AND predictor = {m} AND rank_key > {m}"
#: Of the kept ones tied at the cut, the last to keep by path, and those after it.
_LAST_TIED = (
    "SELECT path FROM run_mistakes WHERE run_id = {m} AND predictor = {m} AND rank_key = {m} "
    "ORDER BY path LIMIT 1 OFFSET {m}"
)
_DROP_TIED = (
    "DELETE FROM run_mistakes WHERE run_id = {m} AND predictor = {m} AND rank_key = {m} "
    "AND path > {m}"
)


def keep_mistakes(conn: Connection, run_id: int, rows: Sequence[PredictionRow]) -> None:
    """Merge a batch's new rows into the run's kept mistakes (under the run's lock): read
    the kept rank keys (a few hundred numbers), insert the batch's mistakes that make the
    cut, drop the kept ones that no longer do: three statements, whatever the run's size.

    Python finds the cut, the ``MISTAKES_KEPT``-th smallest rank key; should more mistakes than
    there is room for tie at it, the database keeps the first of them by path, in its own
    collation (the order every read uses): two statements more, for a rare batch."""
    found = {p: c for p, c in batch_mistakes(rows).items() if c}
    if not found:
        return
    m = "?" if conn.dialect.paramstyle == "qmark" else "%s"  # the driver's own
    kept: dict[str, list[float]] = {}
    for p, key in conn.exec_driver_sql(_KEPT_NOW.format(m=m), (run_id,)):
        kept.setdefault(p, []).append(key)
    added: list[tuple[Any, ...]] = []
    dropped: list[tuple[Any, ...]] = []
    tied: list[tuple[str, float, int]] = []
    for p, candidates in found.items():
        keys = kept.get(p, [])
        if len(keys) + len(candidates) > defaults.MISTAKES_KEPT:
            all_keys = [*keys, *(key for key, _ in candidates)]
            cut = heapq.nsmallest(defaults.MISTAKES_KEPT, all_keys)[-1]
            candidates = [c for c in candidates if c[0] <= cut]
            if any(key > cut for key in keys):
                dropped.append((run_id, p, cut))
            room = defaults.MISTAKES_KEPT - sum(key < cut for key in all_keys)
            if sum(key == cut for key in all_keys) > room:
                tied.append((p, cut, room))
        added += [(run_id, p, path, key) for key, path in candidates]
    # a path kept already (its row deleted by hand and stored again) stays as it is
    insert_rows(conn, "run_mistakes", _COLUMNS_TYPES, added,
                " ON CONFLICT (run_id, predictor, path) DO NOTHING")
    if dropped:
        conn.exec_driver_sql(_DROP.format(m=m), dropped)
    for p, cut, room in tied:
        last = conn.exec_driver_sql(
            _LAST_TIED.format(m=m), (run_id, p, cut, room - 1)
        ).scalar_one_or_none()
        if last is not None:
            conn.exec_driver_sql(_DROP_TIED.format(m=m), (run_id, p, cut, last))


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

