"""The batch function: decode, stack, score and store one batch. Both the embedded path and
the Celery task call :func:`process_batch`; nothing here knows about Celery."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import PurePosixPath
from typing import Any

import numpy as np
import torch
from sqlalchemy import Engine

from db.queries import store_batch_results
from worker.classifier import Classifier
from worker.images import decode_batch
from worker.scoring import score_batch


def label_for(path: str, classes: Sequence[str]) -> str | None:
    """The parent folder's name when it is one of the model's classes, else ``None``."""
    parent = PurePosixPath(path).parent.name
    return parent if parent in classes else None


def to_device(stack: np.ndarray, device: torch.device) -> torch.Tensor:
    """Host stack to the scoring device; on CUDA through pinned memory, without blocking."""
    tensor = torch.from_numpy(stack)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor


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
    rows: list[dict[str, Any]] = [
        {
            "path": p,
            "label": label_for(p, classes),
            "pred_l1": None,
            "pred_l2": None,
            "pred_sgd": None,
            "dist_l1": None,
            "dist_l2": None,
            "prob_sgd": None,
            "error": None,
        }
        for p in paths
    ]
    readable = [i for i, b in enumerate(blobs) if b is not None]
    for i, b in enumerate(blobs):
        if b is None:
            reason = read_errors[i] if read_errors and read_errors[i] else "file could not be read"
            rows[i]["error"] = reason
    stack, ok, errors = decode_batch(
        [blobs[i] for i in readable], classifier.height, classifier.width
    )
    for j, reason in errors.items():
        rows[readable[j]]["error"] = reason
    if ok:
        scores = score_batch(classifier, to_device(stack, device))
        names = np.array(classes, dtype=object)
        l1, l2, sgd = (names[s.numpy()] for s in (scores.pred_l1, scores.pred_l2, scores.pred_sgd))
        d1, d2, pr = (s.tolist() for s in (scores.dist_l1, scores.dist_l2, scores.prob_sgd))
        for n, j in enumerate(ok):
            row = rows[readable[j]]
            row.update(
                pred_l1=l1[n],
                pred_l2=l2[n],
                pred_sgd=sgd[n],
                dist_l1=d1[n],
                dist_l2=d2[n],
                prob_sgd=pr[n],
            )
    return rows


def poison_rows(paths: Sequence[str], classes: Sequence[str], deliveries: int):
    reason = (
        f"batch abandoned after {deliveries} deliveries: the worker process died every time "
        "it took this batch (poison batch)"
    )
    return [
        {"path": p, "label": label_for(p, classes), "pred_l1": None, "pred_l2": None,
         "pred_sgd": None, "dist_l1": None, "dist_l2": None, "prob_sgd": None, "error": reason}
        for p in paths
    ]


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
) -> int:
    """Score one batch and store its rows idempotently; returns the number of new rows."""
    rows = score_items(classifier, paths, blobs, read_errors, device)
    return store_batch_results(engine, run_id, seq, rows)
