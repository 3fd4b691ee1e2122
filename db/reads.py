"""Reads that reports need beyond db/views.py: a model's classes, a run's batches, and the
counts each batch's commit keeps (``batches``, ``batch_counts``, ``batch_failures``; see
db/counts.py), summed over the run's batches, from which a report's accuracies, confusion
matrices, failure reasons, agreement and confidence follow without reading ``predictions``:
a run of a million images has about 250 batches, so each sum reads a few thousand rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import Connection, func, select

from core.classifier import array_from_bytes, classes_from_json, read_stored
from core.columns import PREDICTORS
from core.errors import ModelNotFound
from db.counts import PAIRS, PROB_BINS
from db.models import batch_counts, batch_failures, batches, models, predictions

#: ``{predictor: {label: {predicted: n}}}``, as :func:`db.views.confusion` gives it
Confusion = dict[str, dict[str, dict[str, int]]]


def model_classes(conn: Connection, model_id: int) -> list[str]:
    """The model's class names; :class:`ModelNotFound` when its row is gone (deleted with
    SQLite's foreign keys off), :class:`core.errors.ModelDamaged` when they cannot be read."""
    text = conn.execute(
        select(models.c.classes).where(models.c.id == model_id)
    ).scalar_one_or_none()
    if text is None:
        raise ModelNotFound(f"model {model_id} is gone from this database (deleted)")
    return list(read_stored(model_id, "classes", lambda: classes_from_json(text)))


@dataclass(frozen=True)
class ModelArrays:
    """A stored model's class names, ideal images (``K x H x W``) and SGD weights
    (``H*W x K``) as NumPy arrays: what its pictures need, read without torch."""

    classes: tuple[str, ...]
    ideals: np.ndarray
    weights: np.ndarray

    @property
    def height(self) -> int:
        return int(self.ideals.shape[1])

    @property
    def width(self) -> int:
        return int(self.ideals.shape[2])


def model_arrays(conn: Connection, model_id: int) -> ModelArrays:
    m = models.c
    row = conn.execute(
        select(m.classes, m.height, m.width, m.ideal_images, m.sgd_weights).where(m.id == model_id)
    ).one_or_none()
    if row is None:
        raise ModelNotFound(
            f"model {model_id} does not exist: see `producer models`, or run `producer train DIR`"
        )
    classes = read_stored(model_id, "classes", lambda: classes_from_json(row.classes))
    k, h, w = len(classes), row.height, row.width
    return ModelArrays(
        classes,
        read_stored(model_id, "ideal_images",
                    lambda: array_from_bytes(row.ideal_images, (k, h, w))),
        read_stored(model_id, "sgd_weights", lambda: array_from_bytes(row.sgd_weights, (h * w, k))),
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
    """The run's confusion counts (the view ``run_counts``): labelled, scored images per
    predictor, label and prediction; equal to the ``run_confusion`` view's rows for the
    run."""
    out: Confusion = {p: {} for p in PREDICTORS}
    for (predictor, label, predicted), n in _cells(conn, run_id).items():
        if label is not None and n:
            out.setdefault(predictor, {}).setdefault(label, {})[predicted] = n
    return out


def _cells(conn: Connection, run_id: int) -> dict[tuple[str, str | None, str], int]:
    c = batch_counts.c
    rows = conn.execute(
        select(c.predictor, c.label, c.predicted, func.sum(c.n))
        .where(c.run_id == run_id)
        .group_by(c.predictor, c.label, c.predicted)
    )
    return {(p, label, pred): int(n) for p, label, pred, n in rows}


@dataclass(frozen=True)
class RunSummary:
    """What a report says beyond accuracy, summed over a run's stored batches."""

    #: predictor -> class -> scored images (labelled or not) it predicted as that class
    predicted: dict[str, dict[str, int]]
    scored: int
    agree: int  # scored images all three predictors gave the same answer
    #: (a, b) of :data:`db.counts.PAIRS` -> scored images predictors a and b agree on
    agree_pairs: dict[tuple[str, str], int]
    #: scored images per tenth of prob_sgd: bin i holds i/10 <= p < (i+1)/10, 1.0 the last
    prob_bins: list[int]


def run_summary(conn: Connection, run_id: int) -> RunSummary:
    """The run's predicted classes per predictor, agreement between the predictors and
    histogram of ``prob_sgd``, summed over its batches (the least confident images
    themselves: :func:`db.mistakes.least_confident`)."""
    predicted: dict[str, dict[str, int]] = {p: {} for p in PREDICTORS}
    for (p, _label, pred), n in _cells(conn, run_id).items():
        predicted[p][pred] = predicted[p].get(pred, 0) + n
    b = batches.c
    pair_columns = [b[f"n_agree_{x}_{y}"] for x, y in PAIRS]
    row = conn.execute(
        select(*(func.coalesce(func.sum(c), 0) for c in (b.n_scored, b.n_agree, *pair_columns)))
        .where(b.run_id == run_id)
    ).one()
    bins = [0] * PROB_BINS
    for (stored,) in conn.execute(
        select(b.prob_sgd_bins).where(b.run_id == run_id, b.prob_sgd_bins.is_not(None))
    ):
        for i, n in enumerate(stored):
            bins[i] += int(n)
    return RunSummary(
        predicted, int(row[0]), int(row[1]),
        {pair: int(n) for pair, n in zip(PAIRS, row[2:], strict=True)}, bins,
    )


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
    """``{error, n}`` per reason, most frequent first (the view ``run_failures``)."""
    f = batch_failures.c
    n = func.sum(f.n)
    rows = conn.execute(
        select(f.error, n).where(f.run_id == run_id).group_by(f.error)
        .order_by(n.desc(), f.error)
    )
    return [{"error": e, "n": int(k)} for e, k in rows if k]


def member_records(conn: Connection, run_id: int, paths: list[str]) -> dict[str, dict[str, Any]]:
    """For each of ``paths`` that is an archive member of run ``run_id``, its batch's record
    cut to that member (``archive``, ``format``, ``size`` and its one ``members`` entry), as
    core/archive_batches.read_recorded reads it; loose files are left out."""
    if not paths:
        return {}
    seqs = select(predictions.c.path, predictions.c.batch_seq).where(
        predictions.c.run_id == run_id, predictions.c.path.in_(paths))
    by_seq: dict[int, list[str]] = {}
    for path, seq in conn.execute(seqs):
        by_seq.setdefault(int(seq), []).append(path)
    found: dict[str, dict[str, Any]] = {}
    held = select(batches.c.seq, batches.c.paths, batches.c.members).where(
        batches.c.run_id == run_id, batches.c.seq.in_(list(by_seq)))
    for seq, batch_paths, record in conn.execute(held):
        if not record:  # loose files (the column holds JSON null)
            continue
        where = {path: i for i, path in enumerate(batch_paths or [])}
        for path in by_seq[int(seq)]:
            if path in where:
                found[path] = {**record, "members": [record["members"][where[path]]],
                               "labels": None}
    return found
