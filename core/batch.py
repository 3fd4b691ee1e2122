"""Scoring one batch of files: from the producer's bytes (or read errors) to one prediction
row per file, as columns (core/columns.py). Both the producer's in-process path and the
worker's task call :func:`score_images`; storing the rows is db/'s job."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from core.classifier import Classifier
from core.columns import PREDICTORS, SCORES, BatchColumns, label_for, scored_columns
from core.fast_decode import decode_images
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
) -> BatchColumns:
    """One prediction row per path, in order, as columns: decode, stack and score a batch.

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
    labels = labels_for(paths, classes)
    if class_names is not None:
        labels = [label if name is None else name if name in classes else None
                  for label, name in zip(labels, class_names, strict=True)]
    errors: list[str | None] = [None] * len(paths)
    readable = [i for i, b in enumerate(blobs) if b is not None]
    for i, b in enumerate(blobs):
        if b is None:
            errors[i] = read_errors[i] if read_errors and read_errors[i] else (
                "file could not be read")
    _, height, width = classifier.ideals.shape
    stack, ok, decode_errors = decode_images([b for b in blobs if b is not None], height, width)
    for j, reason in decode_errors.items():
        errors[readable[j]] = reason
    answer_codes = np.full((len(PREDICTORS), len(paths)), -1, dtype=np.int64)
    scores = np.zeros((len(SCORES), len(paths)), dtype=np.float64)
    scored = np.zeros(len(paths), dtype=bool)
    if ok:
        s = score_stack(classifier, stack, device)  # on the CPU
        where = [readable[j] for j in ok]
        answer_codes[:, where] = torch.stack((s.pred_l1, s.pred_l2, s.pred_sgd)).numpy()
        scores[:, where] = torch.stack((s.dist_l1, s.dist_l2, s.prob_sgd)).numpy()
        scored[where] = True
    return scored_columns(list(paths), labels, errors, classes, answer_codes, scores, scored)
