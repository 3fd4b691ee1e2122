"""Reads that reports need beyond db/views.py: a model's classes, a run's batches, and the
counts each batch's commit keeps (``run_counts``, ``run_failures``), from which a report's
accuracies, confusion matrices and failure reasons follow without reading ``predictions``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import Connection, select

from core.classifier import ImageSize
from core.errors import ModelNotFound
from core.rows import PREDICTORS
from core.storage import array_from_bytes, classes_from_json
from db.models import batches, models, run_counts, run_failures

#: ``{predictor: {label: {predicted: n}}}``, as :func:`db.views.confusion` gives it
Confusion = dict[str, dict[str, dict[str, int]]]


def model_classes(conn: Connection, model_id: int) -> list[str]:
    text = conn.execute(select(models.c.classes).where(models.c.id == model_id)).scalar_one()
    return list(classes_from_json(text))


@dataclass(frozen=True)
class ModelArrays(ImageSize):
    """A stored model's class names, ideal images (``K x H x W``) and SGD weights
    (``H*W x K``) as NumPy arrays: what its pictures need, read without torch."""

    classes: tuple[str, ...]
    ideals: np.ndarray
    weights: np.ndarray


def model_arrays(conn: Connection, model_id: int) -> ModelArrays:
    m = models.c
    row = conn.execute(
        select(m.classes, m.height, m.width, m.ideal_images, m.sgd_weights).where(m.id == model_id)
    ).one_or_none()
    if row is None:
        raise ModelNotFound(
            f"model {model_id} does not exist: see `producer models`, or run `producer train DIR`"
        )
    classes = classes_from_json(row.classes)
    k, h, w = len(classes), row.height, row.width
    return ModelArrays(
        classes,
        array_from_bytes(row.ideal_images, (k, h, w)),
        array_from_bytes(row.sgd_weights, (h * w, k)),
    )


def batch_timings(conn: Connection, run_id: int) -> list[Any]:
    """Each batch's status, deliveries, enqueued_at and finished_at."""
    b = batches.c
    return list(
        conn.execute(
            select(b.status, b.deliveries, b.enqueued_at, b.finished_at).where(b.run_id == run_id)
        )
    )


def confusion_counts(conn: Connection, run_id: int) -> Confusion:
    """The run's confusion counts (``run_counts``): labelled, scored images per predictor,
    label and prediction; equal to the ``run_confusion`` view's rows for the run."""
    out: Confusion = {p: {} for p in PREDICTORS}
    c = run_counts.c
    rows = conn.execute(
        select(c.predictor, c.label, c.predicted, c.n).where(c.run_id == run_id, c.n > 0)
    )
    for predictor, label, predicted, n in rows:
        out.setdefault(predictor, {}).setdefault(label, {})[predicted] = int(n)
    return out


def _accuracy(n_images: int, n_correct: int) -> dict[str, Any]:
    return {"n_images": n_images, "n_correct": n_correct, "accuracy": n_correct / n_images}


def class_accuracy(confusion: Confusion) -> list[dict[str, Any]]:
    """``{predictor, label, n_images, n_correct, accuracy}`` per predictor and class, as the
    ``run_class_accuracy`` view gives them, from a run's :func:`confusion_counts`."""
    return [
        {"predictor": p, "label": label, **_accuracy(sum(cells.values()), cells.get(label, 0))}
        for p in sorted(confusion)
        for label, cells in sorted(confusion[p].items())
    ]


def run_accuracy(confusion: Confusion) -> list[dict[str, Any]]:
    """``{predictor, n_images, n_correct, accuracy}`` per predictor with labelled images, as
    the ``run_accuracy`` view gives them, from a run's :func:`confusion_counts`."""
    out = []
    for p in sorted(confusion):
        rows = confusion[p]
        n_images = sum(n for cells in rows.values() for n in cells.values())
        if n_images:
            right = sum(cells.get(label, 0) for label, cells in rows.items())
            out.append({"predictor": p, **_accuracy(n_images, right)})
    return out


def failure_reasons(conn: Connection, run_id: int) -> list[dict[str, Any]]:
    """``{error, n}`` per reason, most frequent first (``run_failures``)."""
    rows = conn.execute(
        select(run_failures.c.error, run_failures.c.n)
        .where(run_failures.c.run_id == run_id, run_failures.c.n > 0)
        .order_by(run_failures.c.n.desc(), run_failures.c.error)
    )
    return [{"error": e, "n": int(k)} for e, k in rows]
