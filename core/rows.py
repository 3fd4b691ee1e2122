"""A ``predictions`` row as the database stores it, defined once (a batch of them as
columns: core/columns.py)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import PurePosixPath
from typing import TypedDict

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
