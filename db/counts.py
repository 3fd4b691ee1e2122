"""What a batch's new rows add to its run's counts: the numbers of ``runs`` (scored, failed,
labelled, right per predictor), the confusion counts of ``run_counts`` and the failure
reasons of ``run_failures``. The transaction that stores the rows adds them
(:func:`db.queries.add_to_run`), so the counts are always those of the run's rows.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import chain
from operator import itemgetter
from typing import Any

from sqlalchemy import Connection

from core.rows import PREDICTORS, PredictionRow


@dataclass(frozen=True)
class RowCounts:
    """What a set of prediction rows adds to its run's counts."""

    scored: int = 0
    failed: int = 0
    labelled: int = 0  # scored, with a label
    correct: tuple[int, int, int] = (0, 0, 0)  # of those, right by l1, l2, sgd
    #: (predictor, label, predicted) -> labelled, scored rows: what ``run_counts`` adds
    confusion: dict[tuple[str, str, str], int] = field(default_factory=dict)
    #: error -> failed rows: what ``run_failures`` adds
    failures: dict[str, int] = field(default_factory=dict)


_ERROR = itemgetter("error")
_ANSWERS = {p: itemgetter("label", f"pred_{p}") for p in PREDICTORS}


def count_rows(rows: Sequence[PredictionRow]) -> RowCounts:
    """The counts ``rows`` add. A row is scored when it has no error, and then has every
    prediction; an unscored row has none (see core/rows.py): so the (label, prediction)
    pairs with both set are the labelled, scored rows. Each count is a ``Counter`` over the
    rows (a loop in C); only the distinct pairs, a few dozen, are looked at one by one."""
    errors = Counter(map(_ERROR, rows))
    scored = errors.pop(None, 0)
    confusion: dict[tuple[str, str, str], int] = {}
    right = [0, 0, 0]
    labelled = 0
    for i, p in enumerate(PREDICTORS):
        n_answered = 0
        for (label, pred), n in Counter(map(_ANSWERS[p], rows)).items():
            if label is not None and pred is not None:
                confusion[(p, label, pred)] = n
                n_answered += n
                right[i] += n if pred == label else 0
        labelled = n_answered  # the same for every predictor
    return RowCounts(
        scored, len(rows) - scored, labelled, (right[0], right[1], right[2]), confusion,
        dict(errors),
    )


#: Rows per statement on SQLite (at most 5 values each: within its 32,766 parameters).
_ROWS = 500


@lru_cache(maxsize=64)
def _values_sql(table: str, columns: tuple[str, ...], n_rows: int, tail: str) -> str:
    one = "(" + ", ".join(["?"] * len(columns)) + ")"
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES {', '.join([one] * n_rows)}{tail}"


def insert_rows(
    conn: Connection,
    table: str,
    columns: dict[str, str],
    rows: Sequence[tuple[Any, ...]],
    tail: str = "",
) -> None:
    """Insert ``rows`` (tuples in the order of ``columns``, which maps each column to its
    PostgreSQL type) in one statement, ``tail`` (e.g. an ``ON CONFLICT`` clause) after it.

    On PostgreSQL the rows go as one array per column, through ``unnest``: one statement of
    fixed text, prepared once (a multi-row ``VALUES`` of 300 rows took 5-12 ms there, against
    1.7 ms); on SQLite as multi-row ``VALUES`` statements. Either goes to the driver as it is:
    SQLAlchemy's handling of each of a thousand parameters cost more than the statement."""
    if not rows:
        return
    names = tuple(columns)
    if conn.dialect.name == "postgresql":
        arrays = ", ".join(f"%s::{t}[]" for t in columns.values())
        conn.exec_driver_sql(
            f"INSERT INTO {table} ({', '.join(names)}) SELECT * FROM unnest({arrays}){tail}",
            tuple(list(column) for column in zip(*rows, strict=True)),
        )
        return
    for start in range(0, len(rows), _ROWS):
        part = rows[start : start + _ROWS]
        conn.exec_driver_sql(
            _values_sql(table, names, len(part), tail), tuple(chain.from_iterable(part))
        )


def _adds(table: str, key: tuple[str, ...]) -> str:
    """The ``ON CONFLICT`` clause that adds ``n`` to a row already there."""
    return f" ON CONFLICT (run_id, {', '.join(key)}) DO UPDATE SET n = {table}.n + excluded.n"


_CONFUSION_COLUMNS = {
    "run_id": "int", "predictor": "text", "label": "text", "predicted": "text", "n": "int",
}
_FAILURE_COLUMNS = {"run_id": "int", "error": "text", "n": "int"}


def add_counts(conn: Connection, run_id: int, new: RowCounts) -> None:
    """Add a batch's new rows to the run's confusion counts and failure reasons: one upsert
    per table (a batch of ten classes touches at most 300 cells), the same
    ``INSERT ... ON CONFLICT DO UPDATE SET n = n + excluded.n`` on both databases."""
    insert_rows(
        conn, "run_counts", _CONFUSION_COLUMNS,
        [(run_id, *cell, n) for cell, n in sorted(new.confusion.items())],
        _adds("run_counts", ("predictor", "label", "predicted")),
    )
    insert_rows(
        conn, "run_failures", _FAILURE_COLUMNS,
        [(run_id, error, n) for error, n in sorted(new.failures.items())],
        _adds("run_failures", ("error",)),
    )
