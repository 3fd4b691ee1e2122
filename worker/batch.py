"""The batch function: decode, stack, score and store one batch. Both the embedded path and
the Celery task call :func:`process_batch`; nothing here knows about Celery."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields
from pathlib import PurePosixPath
from typing import Any

import numpy as np
import torch
from sqlalchemy import Engine

from db.queries import store_batch_results
from worker.classifier import Classifier
from worker.fast_decode import decode_batch  # libspng for plain PNGs, else worker.images
from worker.scoring import Scores, score_batch

#: Images scored at once on the CPU. The distance temporary of 256 images (8 MB) stays in
#: the CPU's last-level cache; a whole batch of 1,024 (32 MB) does not. Measured on one
#: thread with 1,024 digits: 5.6-5.8 us an image at 256, 7.3-7.6 at 64, 8.4-8.9 at 1,024.
#: The results are the same bit for bit (every image is scored on its own row).
CPU_SCORE_ROWS = 256


def label_for(path: str, classes: Sequence[str]) -> str | None:
    """The parent folder's name when it is one of the model's classes, else ``None``."""
    parent = PurePosixPath(path).parent.name
    return parent if parent in classes else None


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


def unscored_row(path: str, label: str | None, error: str | None = None) -> dict[str, Any]:
    """A ``predictions`` row with no predictions yet (and, if given, the reason why not)."""
    return {
        "path": path, "label": label, "pred_l1": None, "pred_l2": None, "pred_sgd": None,
        "dist_l1": None, "dist_l2": None, "prob_sgd": None, "error": error,
    }


def to_device(stack: np.ndarray, device: torch.device) -> torch.Tensor:
    """Host stack to the scoring device; on CUDA through pinned memory, without blocking."""
    tensor = torch.from_numpy(stack)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor


def score_stack(classifier: Classifier, stack: np.ndarray, device: torch.device) -> Scores:
    """Score a host ``N x H x W`` uint8 stack on ``device``: on the CPU in slices of
    :data:`CPU_SCORE_ROWS` images, elsewhere all at once."""
    if device.type != "cpu" or len(stack) <= CPU_SCORE_ROWS:
        return score_batch(classifier, to_device(stack, device))
    parts = [
        score_batch(classifier, torch.from_numpy(stack[i : i + CPU_SCORE_ROWS]))
        for i in range(0, len(stack), CPU_SCORE_ROWS)
    ]
    return Scores(*(torch.cat([getattr(p, f.name) for p in parts]) for f in fields(Scores)))


def score_items(
    classifier: Classifier,
    paths: Sequence[str],
    blobs: Sequence[bytes | None],
    read_errors: Sequence[str | None] | None = None,
    device: torch.device | None = None,
) -> list[dict[str, Any]]:
    """One prediction row (a dict of ``predictions`` columns) per path, in order.

    ``blobs[i]`` is the encoded file; where the producer could not read it, ``blobs[i]`` is
    ``None`` and ``read_errors[i]`` says why. The classifier must already be on ``device``.
    """
    if len(paths) != len(blobs):
        raise ValueError(f"{len(paths)} paths but {len(blobs)} images in one batch")
    device = device or torch.device("cpu")
    classes = classifier.classes
    blank = unscored_row("", None)
    rows = [
        {**blank, "path": p, "label": label}
        for p, label in zip(paths, labels_for(paths, classes), strict=True)
    ]
    readable = [i for i, b in enumerate(blobs) if b is not None]
    for i, b in enumerate(blobs):
        if b is None:
            reason = read_errors[i] if read_errors and read_errors[i] else "file could not be read"
            rows[i]["error"] = reason
    stack, ok, errors = decode_batch(
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


def poison_rows(
    paths: Sequence[str], classes: Sequence[str], deliveries: int
) -> list[dict[str, Any]]:
    reason = (
        f"batch abandoned after {deliveries} deliveries: the worker process died every time "
        "it took this batch (poison batch)"
    )
    return [unscored_row(p, label_for(p, classes), reason) for p in paths]


def abandon_batch(
    engine: Engine, classifier: Classifier, run_id: int, seq: int, paths: Sequence[str],
    deliveries: int,
) -> int:
    """Give up on a batch that killed every worker that took it: an error row per image and
    the batch marked failed, so the run still completes."""
    rows = poison_rows(paths, classifier.classes, deliveries)
    return store_batch_results(engine, run_id, seq, rows, batch_status="failed")


def process_batch(
    engine: Engine,
    classifier: Classifier,
    run_id: int,
    seq: int,
    paths: Sequence[str],
    blobs: Sequence[bytes | None],
    read_errors: Sequence[str | None] | None = None,
    device: torch.device | None = None,
    deliveries: int = 0,
) -> int:
    """Score one batch and store its rows idempotently, adding ``deliveries`` to the batch's
    delivery count in the same transaction; returns the number of new rows."""
    rows = score_items(classifier, paths, blobs, read_errors, device)
    return store_batch_results(engine, run_id, seq, rows, deliveries=deliveries)
