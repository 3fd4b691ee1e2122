"""Pixel similarity: the per-class mean image ("ideal digit") and distances to it."""

from __future__ import annotations

import threading

import torch

#: Per thread, the difference tensor of the last call, reused while the shapes allow: a
#: fresh one per chunk (8 MB for 256 images and 10 classes) was mapped and faulted in by the
#: allocator on every batch.
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


def ideal_image(stacked: torch.Tensor) -> torch.Tensor:
    """The mean of a ``N x H x W`` uint8 stack: ``stack.float()/255`` then ``mean(0)``."""
    if stacked.shape[0] == 0:
        raise ValueError("cannot average an empty stack of images")
    return (stacked.float() / 255).mean(0)


def ideal_images(stacked: torch.Tensor, labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """One ideal image per class, ``K x H x W``, from images labelled ``0..K-1``."""
    return torch.stack([ideal_image(stacked[labels == k]) for k in range(n_classes)])


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
