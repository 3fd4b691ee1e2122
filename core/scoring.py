"""Scoring a stack of images against a classifier: distances to the ideal images, the linear
model, and the prediction of each. The arithmetic only: no files, no database, no Celery."""

from __future__ import annotations

import threading
from dataclasses import dataclass, fields
from functools import lru_cache

import numpy as np
import torch

from core.classifier import Classifier
from core.defaults import CPU_SCORE_ROWS

#: Per thread, the difference tensor of the last call, reused while the shapes allow, so the
#: allocator does not map and fault in a fresh one for every slice.
_scratch = threading.local()


def _difference_buffer(rows: int, k: int, d: int, like: torch.Tensor) -> torch.Tensor:
    buf: torch.Tensor | None = getattr(_scratch, "diff", None)
    if (
        buf is None
        or buf.shape[0] < rows
        or buf.shape[1:] != (k, d)
        or buf.dtype != like.dtype
        or buf.device != like.device
        or buf.is_inference() != torch.is_inference_mode_enabled()  # made in the other mode
    ):
        buf = torch.empty((rows, k, d), dtype=like.dtype, device=like.device)
        _scratch.diff = buf
    return buf[:rows]


@lru_cache(maxsize=8)
def pixel_table(device: torch.device) -> torch.Tensor:
    """The 256 grey levels scaled to 0-1 as the CPU divides them (IEEE division, correctly
    rounded), on ``device``. CUDA divides a tensor by a scalar by multiplying with its
    reciprocal, which is 1 ulp off for 126 of the 256 levels; looking the levels up in this
    table gives a GPU the CPU's bits."""
    with torch.inference_mode(False):
        return torch.arange(256, dtype=torch.float32).div_(255).to(device)


def scaled_pixels(stacked: torch.Tensor) -> torch.Tensor:
    """A ``N x H x W`` uint8 stack as ``N x (H*W)`` floats in 0-1, the same bits on every
    device: on the CPU by division (one temporary), elsewhere through :func:`pixel_table`."""
    flat = stacked.reshape(stacked.shape[0], -1)
    if stacked.device.type == "cpu":
        return flat.float().div_(255)
    return pixel_table(stacked.device)[flat.long()]


def distances(x: torch.Tensor, ideals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """L1 (mean absolute difference) and L2 (RMSE) from each image to each ideal image.

    ``x`` is ``N x D`` floats in 0-1, ``ideals`` is ``K x D``; both results are ``N x K``.
    Broadcasting ``N x 1 x D`` against ``1 x K x D``, done in chunks so that the temporary
    difference tensor stays under about 64 MB whatever the batch size. The difference is
    written into a buffer kept for the next call, made absolute and then squared in place
    (``|d| * |d|`` is ``d * d`` exactly): no temporary per chunk, the same bits.
    """
    n, d = x.shape
    k = ideals.shape[0]
    chunk = max(1, (16 * 1024 * 1024) // max(1, k * d))
    l1 = torch.empty((n, k), dtype=x.dtype, device=x.device)
    l2 = torch.empty((n, k), dtype=x.dtype, device=x.device)
    for start in range(0, n, chunk):
        rows = slice(start, start + chunk)
        diff = _difference_buffer(min(chunk, n - start), k, d, x)
        torch.sub(x[rows, None, :], ideals[None, :, :], out=diff)
        diff.abs_()
        torch.mean(diff, -1, out=l1[rows])
        diff.mul_(diff)
        torch.mean(diff, -1, out=l2[rows])
    return l1, l2.sqrt_()


def linear(x: torch.Tensor, weights: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The SGD model's logits: ``x @ weights + bias``."""
    return x @ weights + bias


@dataclass(frozen=True)
class Scores:
    """Per image: the predicted class index of each predictor and how sure it was.

    ``dist_l1``/``dist_l2`` are the distances to the predicted class's ideal image;
    ``prob_sgd`` is the softmax probability of the SGD model's predicted class.
    """

    pred_l1: torch.Tensor
    pred_l2: torch.Tensor
    pred_sgd: torch.Tensor
    dist_l1: torch.Tensor
    dist_l2: torch.Tensor
    prob_sgd: torch.Tensor

    def __len__(self) -> int:
        return int(self.pred_l1.shape[0])


@torch.inference_mode()
def score_tensor(classifier: Classifier, stacked: torch.Tensor) -> Scores:
    """Score a ``N x H x W`` uint8 stack (on the classifier's device); results on the CPU."""
    x = scaled_pixels(stacked)
    ideals = classifier.ideals.reshape(classifier.ideals.shape[0], -1)
    l1, l2 = distances(x, ideals)
    dist_l1, pred_l1 = l1.min(1)
    dist_l2, pred_l2 = l2.min(1)
    probs = torch.softmax(linear(x, classifier.weights, classifier.bias), dim=1)
    prob_sgd, pred_sgd = probs.max(1)
    return Scores(
        pred_l1.cpu(), pred_l2.cpu(), pred_sgd.cpu(), dist_l1.cpu(), dist_l2.cpu(), prob_sgd.cpu()
    )


def to_device(stack: np.ndarray, device: torch.device) -> torch.Tensor:
    """Host stack to the scoring device; on CUDA through pinned memory, without blocking."""
    tensor = torch.from_numpy(stack)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor


def score_stack(classifier: Classifier, stack: np.ndarray, device: torch.device) -> Scores:
    """Score a host ``N x H x W`` uint8 stack on ``device`` (where the classifier already
    is): on the CPU in slices of ``CPU_SCORE_ROWS`` images, elsewhere all at once."""
    if device.type != "cpu" or len(stack) <= CPU_SCORE_ROWS:
        return score_tensor(classifier, to_device(stack, device))
    parts = [
        score_tensor(classifier, torch.from_numpy(stack[i : i + CPU_SCORE_ROWS]))
        for i in range(0, len(stack), CPU_SCORE_ROWS)
    ]
    return Scores(*(torch.cat([getattr(p, f.name) for p in parts]) for f in fields(Scores)))
