"""How long a batch takes on this worker's device, measured as a pool process starts, and a
warning when a batch of the default size would outlast the task time limit: such a batch is
stopped, and split on its next delivery (worker/splitting.py), each stop costing a limit's
wait. A sample of synthetic 28x28 PNG digits, ten classes, goes through the scoring function
the task uses; the estimate is linear in the batch's images."""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable
from typing import Any

from core.text import plural

log = logging.getLogger("digitscore.worker")

#: Images in the sample the estimate is measured on.
SAMPLE = 64


def sample_batch(n: int = SAMPLE) -> tuple[Any, list[str], list[bytes | None]]:
    """A random ten-class classifier of 28x28 images, and ``n`` random PNGs named by class."""
    import numpy as np
    import torch
    from PIL import Image

    from core.classifier import Classifier

    rng = np.random.default_rng(0)
    classes = tuple(str(k) for k in range(10))
    clf = Classifier(classes, torch.rand(10, 28, 28), torch.randn(784, 10), torch.zeros(10))
    blobs: list[bytes | None] = []
    for _ in range(n):
        out = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(out, "PNG")
        blobs.append(out.getvalue())
    return clf, [f"{k % 10}/{k}.png" for k in range(n)], blobs


def seconds_per_image(score: Callable[..., Any], device: str) -> float:
    """Seconds ``score`` (``core.scoring.score_images``'s signature) takes per image on
    ``device``, on :data:`SAMPLE` images after one warm-up."""
    import torch

    clf, paths, blobs = sample_batch()
    clf = clf.to(device)
    errors: list[str | None] = [None] * len(paths)
    score(clf, paths[:2], blobs[:2], errors[:2], torch.device(device))
    start = time.perf_counter()
    score(clf, paths, blobs, errors, torch.device(device))
    return (time.perf_counter() - start) / len(paths)


def time_limit_warning(
    per_image: float, batch_images: int, time_limit: int, visibility_timeout: int
) -> str | None:
    """A warning when a batch of ``batch_images`` at ``per_image`` seconds would take more
    than half of ``time_limit`` (leaving room for a slower batch), else ``None``."""
    from core import defaults

    expected = per_image * batch_images
    if expected <= time_limit / 2:
        return None
    return (
        f"a batch of {plural(batch_images, 'image')} takes about {expected:,.1f} s on this device "
        f"(measured on {SAMPLE}), more than half the task time limit of {time_limit} s "
        f"({defaults.VISIBILITY_TIMEOUT_ENV}={visibility_timeout}): such batches "
        f"are stopped and split; raise {defaults.VISIBILITY_TIMEOUT_ENV}, or submit with a "
        f"smaller --batch-size"
    )
