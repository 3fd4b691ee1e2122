"""Scoring one batch of files: from the producer's bytes (or read errors) to one prediction
row per file. Both the producer's in-process path and the worker's task call
:func:`score_images`; storing the rows is db/'s job."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch

from core.classifier import Classifier
from core.fast_decode import decode_images
from core.rows import PredictionRow, label_for, unscored_row
from core.scoring import score_stack
from core.text import plural


def labels_for(paths: Sequence[str], classes: Sequence[str]) -> list[str | None]:
    """:func:`label_for` of each path, computed once per folder: a name other than ``""`` and
    ``"."`` after the last ``/`` leaves the parent folder's name to the text before it."""
    by_folder: dict[str, str | None] = {}
    labels: list[str | None] = []
    for path in paths:
        folder, _, name = path.rpartition("/")
        if name in ("", "."):
            labels.append(label_for(path, classes))
            continue
        if folder not in by_folder:
            by_folder[folder] = label_for(path, classes)
        labels.append(by_folder[folder])
    return labels


def score_images(
    classifier: Classifier,
    paths: Sequence[str],
    blobs: Sequence[bytes | None],
    read_errors: Sequence[str | None] | None = None,
    device: torch.device | None = None,
    class_names: Sequence[str | None] | None = None,
) -> list[PredictionRow]:
    """One prediction row per path, in order: decode, stack and score a batch.

    ``blobs[i]`` is the encoded file; where the producer could not read it, ``blobs[i]`` is
    ``None`` and ``read_errors[i]`` says why. The classifier must already be on ``device``.
    ``class_names[i]``, when given and not ``None``, is the image's class as an archive's
    WebDataset ``.cls`` member names it, in place of its folder's name.
    """
    if len(paths) != len(blobs):
        raise ValueError(
            f"{plural(len(paths), 'path')} but {plural(len(blobs), 'image')} in one batch"
        )
    device = device or torch.device("cpu")
    classes = classifier.classes
    blank = unscored_row("", None)
    labels = labels_for(paths, classes)
    if class_names is not None:
        labels = [label if name is None else name if name in classes else None
                  for label, name in zip(labels, class_names, strict=True)]
    rows = cast(list[PredictionRow], [  # copies of one blank row
        {**blank, "path": p, "label": label} for p, label in zip(paths, labels, strict=True)
    ])
    readable = [i for i, b in enumerate(blobs) if b is not None]
    for i, b in enumerate(blobs):
        if b is None:
            reason = read_errors[i] if read_errors and read_errors[i] else "file could not be read"
            rows[i]["error"] = reason
    stack, ok, errors = decode_images(
        [b for b in blobs if b is not None], classifier.height, classifier.width
    )
    for j, reason in errors.items():
        rows[readable[j]]["error"] = reason
    if ok:
        scores = score_stack(classifier, stack, device)
        l1, l2, sgd = (
            [classes[k] for k in s.tolist()]
            for s in (scores.pred_l1, scores.pred_l2, scores.pred_sgd)
        )
        d1, d2, pr = (s.tolist() for s in (scores.dist_l1, scores.dist_l2, scores.prob_sgd))
        where = readable if len(ok) == len(readable) else [readable[j] for j in ok]
        for i, a, b, c, x, y, z in zip(where, l1, l2, sgd, d1, d2, pr, strict=True):
            row = rows[i]
            row["pred_l1"], row["pred_l2"], row["pred_sgd"] = a, b, c
            row["dist_l1"], row["dist_l2"], row["prob_sgd"] = x, y, z
    return rows

