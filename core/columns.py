"""A ``predictions`` row as the database stores it, defined once, and a batch of them as
columns: what scoring makes (core/scoring.py) and what storing reads (db/: the counts, the
kept lists and the binary COPY), so that each is a few NumPy operations over the batch
instead of a Python loop over its rows.

NumPy is imported by the functions that need it: submitting a run imports this module and
needs none.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from operator import itemgetter
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any, TypedDict

if TYPE_CHECKING:
    import numpy as np

#: The predictors, in the order every report lists them; ``pred_<p>`` is each one's column.
PREDICTORS = ("l1", "l2", "sgd")


class PredictionRow(TypedDict):
    """One image's result: its predictions, or the reason it could not be scored."""

    path: str
    label: str | None
    pred_l1: str | None
    pred_l2: str | None
    pred_sgd: str | None
    dist_l1: float | None
    dist_l2: float | None
    prob_sgd: float | None
    error: str | None


#: The keys of a row, in the order they are written.
ROW_KEYS: tuple[str, ...] = tuple(PredictionRow.__annotations__)


def unscored_row(path: str, label: str | None, error: str | None = None) -> PredictionRow:
    """A row with no predictions (yet), and, if given, the reason why not."""
    return PredictionRow(
        path=path, label=label, pred_l1=None, pred_l2=None, pred_sgd=None,
        dist_l1=None, dist_l2=None, prob_sgd=None, error=error,
    )


def label_for(path: str, classes: Sequence[str]) -> str | None:
    """The parent folder's name when it is one of the model's classes, else ``None``."""
    parent = PurePosixPath(path).parent.name
    return parent if parent in classes else None


#: The score columns, in the order of :attr:`BatchColumns.scores`.
SCORES = ("dist_l1", "dist_l2", "prob_sgd")


@dataclass(frozen=True)
class BatchColumns:
    """The rows of a batch, column by column, in their order.

    Text columns are lists as the rows hold them; each row's label and answers are also
    codes into :attr:`classes` (``-1`` for ``None``), and each score a float64 array beside
    a mask of the rows that have it (``None`` is not NaN)."""

    paths: list[str]
    labels: list[str | None]
    answers: tuple[list[str | None], ...]  # pred_l1, pred_l2, pred_sgd
    errors: list[str | None]
    scores: tuple[np.ndarray, ...]  # dist_l1, dist_l2, prob_sgd; 0.0 where absent
    has_score: tuple[np.ndarray, ...]  # bool, per score column
    classes: tuple[str, ...]  # every label and answer among them (and perhaps more)
    label_codes: np.ndarray  # int64, -1 for no label
    answer_codes: np.ndarray  # int64, shape (predictors, rows), -1 for no answer

    def take(self, keep: Sequence[int]) -> BatchColumns:
        """The rows at the indices ``keep``, in that order."""
        import numpy as np

        at = np.asarray(keep, dtype=np.int64)
        return BatchColumns(
            [self.paths[i] for i in keep], [self.labels[i] for i in keep],
            tuple([a[i] for i in keep] for a in self.answers), [self.errors[i] for i in keep],
            tuple(s[at] for s in self.scores), tuple(h[at] for h in self.has_score),
            self.classes, self.label_codes[at], self.answer_codes[:, at],
        )

    def rows(self) -> list[PredictionRow]:
        """The rows as :class:`PredictionRow` mappings."""
        return [
            PredictionRow(path=p, label=lab, pred_l1=a1, pred_l2=a2, pred_sgd=a3, dist_l1=d1,
                          dist_l2=d2, prob_sgd=pr, error=e)
            for p, lab, a1, a2, a3, d1, d2, pr, e in zip(
                self.paths, self.labels, *self.answers, *self.score_lists(), self.errors,
                strict=True)
        ]

    def score_lists(self) -> list[list[float | None]]:
        """The score columns as lists, ``None`` where a row has no score."""
        import numpy as np

        out: list[list[float | None]] = []
        for values, has in zip(self.scores, self.has_score, strict=True):
            column: list[float | None] = values.tolist()
            for j in np.flatnonzero(~has).tolist():
                column[j] = None
            out.append(column)
        return out


def batch_columns(rows: Sequence[Any]) -> BatchColumns:
    """The columns of ``rows`` (:class:`PredictionRow` or any mapping with its
    keys)."""
    import numpy as np

    paths = list(map(itemgetter("path"), rows))
    labels = list(map(itemgetter("label"), rows))
    answers = tuple(list(map(itemgetter(f"pred_{p}"), rows)) for p in PREDICTORS)
    errors = list(map(itemgetter("error"), rows))
    classes = tuple(sorted(set(labels).union(*answers) - {None}))
    code = _codes(classes).__getitem__
    n = len(paths)
    scores, has = [], []
    for name in SCORES:
        values = list(map(itemgetter(name), rows))
        if None in values:
            present = np.fromiter((v is not None for v in values), dtype=bool, count=n)
            values = [0.0 if v is None else v for v in values]
        else:
            present = np.ones(n, dtype=bool)
        scores.append(np.array(values, dtype=np.float64).reshape(n))
        has.append(present)
    answer_codes = np.array(
        [np.fromiter(map(code, a), dtype=np.int64, count=n) for a in answers], dtype=np.int64
    ).reshape(len(PREDICTORS), n)
    return BatchColumns(
        paths, labels, answers, errors, tuple(scores), tuple(has), classes,
        np.fromiter(map(code, labels), dtype=np.int64, count=n), answer_codes,
    )


def scored_columns(
    paths: list[str],
    labels: list[str | None],
    errors: list[str | None],
    classes: tuple[str, ...],
    answer_codes: np.ndarray,
    scores: np.ndarray,
    scored: np.ndarray,
) -> BatchColumns:
    """The columns scoring makes: ``answer_codes`` (predictors x rows, -1 for none) index
    ``classes``, which hold every label; ``scores`` (3 x rows, in the order of
    :data:`SCORES`) hold a value where ``scored``, and 0.0 elsewhere."""
    import numpy as np

    names: list[str | None] = [*classes, None]  # code -1 is the last
    n = len(paths)
    return BatchColumns(
        paths, labels,
        tuple(list(map(names.__getitem__, row)) for row in answer_codes.tolist()),
        errors, tuple(scores),
        (scored,) * len(SCORES), classes,
        np.fromiter(map(_codes(classes).__getitem__, labels), dtype=np.int64, count=n),
        answer_codes,
    )


def _codes(classes: tuple[str, ...]) -> dict[str | None, int]:
    """Each class's code, its index; ``None``'s is -1."""
    return {None: -1, **{c: i for i, c in enumerate(classes)}}
