"""Scoring images against a classifier: a batch of encoded files to one prediction row per
file, as columns (core/columns.py), by :func:`score_images`, which both the producer's
in-process path and the worker's task call; and under it the arithmetic on a stack of
images: distances to the ideal images, the linear model, and the prediction of each. No
files, no database, no Celery: storing the rows is db/'s job."""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from core.classifier import Classifier
from core.columns import PREDICTORS, SCORES, BatchColumns, label_for, scored_columns
from core.defaults import CPU_DIFFERENCE_ELEMENTS, GPU_DIFFERENCE_ELEMENTS
from core.fast_decode import decode_images
from core.text import plural

#: Elements of the difference tensor that :func:`distances` fills at once, per device type
#: (``core.defaults``); any other device type gets ``GPU_DIFFERENCE_ELEMENTS``.
DIFFERENCE_ELEMENTS = {"cpu": CPU_DIFFERENCE_ELEMENTS}

#: Per thread, the large tensors of the last call (the difference tensor, the grey levels as
#: floats), reused while the shapes allow: a fresh one each batch would be mapped and faulted
#: in again, and freeing them between batches lets the heap fragment and grow with the run.
_scratch = threading.local()


def _buffer(name: str, rows: int, rest: tuple[int, ...], dtype: torch.dtype,
            device: torch.device) -> torch.Tensor:
    """A ``rows x *rest`` tensor of this thread's scratch ``name``: the one of the last call
    when it is large enough and alike, else a new one kept for the next."""
    buf: torch.Tensor | None = getattr(_scratch, name, None)
    if (
        buf is None
        or buf.shape[0] < rows
        or buf.shape[1:] != rest
        or buf.dtype != dtype
        or buf.device != device
        or buf.is_inference() != torch.is_inference_mode_enabled()  # made in the other mode
    ):
        buf = torch.empty((rows, *rest), dtype=dtype, device=device)
        setattr(_scratch, name, buf)
    return buf[:rows]


@lru_cache(maxsize=8)
def pixel_table(device: torch.device) -> torch.Tensor:
    """The 256 grey levels scaled to 0-1 as the CPU divides them (IEEE division, correctly
    rounded), on ``device``. CUDA divides a tensor by a scalar by multiplying with its
    reciprocal, which is 1 ulp off for 126 of the 256 levels; looking the levels up in this
    table gives a GPU the CPU's bits."""
    with torch.inference_mode(False):
        return torch.arange(256, dtype=torch.float32).div_(255).to(device)


def scaled_pixels(stacked: torch.Tensor, levels: torch.Tensor | None = None) -> torch.Tensor:
    """A ``N x H x W`` uint8 stack as ``N x (H*W)`` floats in 0-1, the same bits on every
    device: on the CPU by division, of ``levels`` in place when given (the stack's grey
    levels as ``N x (H*W)`` floats) or else of a copy; elsewhere through :func:`pixel_table`."""
    flat = stacked.reshape(stacked.shape[0], -1)
    if stacked.device.type == "cpu":
        return (flat.float() if levels is None else levels).div_(255)
    return looked_up_pixels(flat)


def looked_up_pixels(flat: torch.Tensor) -> torch.Tensor:
    """``N x D`` uint8 grey levels as their :func:`pixel_table` entries. The indices are int32
    (4 bytes a pixel; a grey level needs one byte and ``index_select`` takes int32 or int64),
    and the table is read with one gather."""
    index = flat.reshape(-1).int()
    return pixel_table(flat.device).index_select(0, index).reshape(flat.shape)


def distances(x: torch.Tensor, ideals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """L1 (mean absolute difference) and L2 (RMSE) from each image to each ideal image.

    ``x`` is ``N x D`` floats in 0-1, ``ideals`` is ``K x D``; both results are ``N x K``.
    Broadcasting ``N x 1 x D`` against ``1 x K x D``, done in chunks so that the temporary
    difference tensor holds at most :data:`DIFFERENCE_ELEMENTS` whatever the batch size. The
    difference is written into a buffer kept for the next call, made absolute and then
    squared in place (``|d| * |d|`` is ``d * d`` exactly): no temporary per chunk, the same
    bits.
    """
    n, d = x.shape
    k = ideals.shape[0]
    budget = DIFFERENCE_ELEMENTS.get(x.device.type, GPU_DIFFERENCE_ELEMENTS)
    chunk = max(1, budget // max(1, k * d))
    l1 = torch.empty((n, k), dtype=x.dtype, device=x.device)
    l2 = torch.empty((n, k), dtype=x.dtype, device=x.device)
    for start in range(0, n, chunk):
        rows = slice(start, start + chunk)
        diff = _buffer("diff", min(chunk, n - start), (k, d), x.dtype, x.device)
        torch.sub(x[rows, None, :], ideals[None, :, :], out=diff)
        diff.abs_()
        torch.mean(diff, -1, out=l1[rows])
        diff.mul_(diff)
        torch.mean(diff, -1, out=l2[rows])
    return l1, l2.sqrt_()


#: The grey levels and the weights' parts are whole numbers, and a float32 sum of whole
#: numbers is exact while it stays below this.
_EXACT_FLOAT32 = 2**24


@lru_cache(maxsize=8)
def weight_parts(weights: torch.Tensor) -> tuple[torch.Tensor, int, torch.Tensor]:
    """The ``D x K`` weights as whole numbers (``W = round(weights / q)``, ``q`` a power of
    two per column that keeps 24 bits of its largest weight, as float32 does) cut into parts
    of ``b`` bits: ``D x (P*K)`` float32 columns, part ``i`` of ``W`` being ``W``'s bits
    ``b*i`` to ``b*i + b`` with its sign. ``b`` is the most bits for which a sum over ``D``
    grey levels (0-255) times a part stays below 2**24. Returns the parts, ``b`` and
    ``q / 255`` (float64, per column)."""
    with torch.inference_mode(False):
        w = weights.double()
        top = w.abs().amax(0).clamp_min(torch.finfo(torch.float32).tiny)
        q = torch.exp2(torch.floor(torch.log2(top)) - 23)
        whole = torch.round(w / q)
        bits = max(1, int(math.log2(_EXACT_FLOAT32 / (255 * w.shape[0]) + 1)))
        mag, sign = whole.abs(), whole.sign()
        parts = [sign * torch.remainder(torch.floor(mag / 2.0 ** (bits * i)), 2.0**bits)
                 for i in range(math.ceil(24 / bits))]
        return torch.cat(parts, 1).float(), bits, q / 255


def linear(x: torch.Tensor, weights: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The SGD model's logits: ``x @ weights + bias`` (training; scoring uses
    :func:`exact_logits`)."""
    return x @ weights + bias


def exact_logits(levels: torch.Tensor, weights: torch.Tensor, bias: torch.Tensor,
                 ) -> torch.Tensor:
    """The SGD model's logits, ``(levels / 255) @ weights + bias``, from ``N x D`` grey levels
    (0-255, float32), a row's bits the same wherever the row sits in whichever batch.

    A float32 matrix product gives a row other last bits at another position in its block
    (MKL's kernels), so the same image scored beside other images would get another
    ``prob_sgd``. Here the product is of whole numbers only (:func:`weight_parts`), every
    partial sum exact in float32 whatever the order, so one matrix product gives each part's
    exact sums; they are joined exactly in float64, scaled once and rounded to float32."""
    parts, bits, scale = weight_parts(weights)
    sums = (levels @ parts).double().view(levels.shape[0], -1, weights.shape[1])
    whole = sums[:, -1]
    for i in range(sums.shape[1] - 2, -1, -1):
        whole = whole * 2.0**bits + sums[:, i]
    return (whole * scale + bias.double()).float()


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
    flat = stacked.reshape(stacked.shape[0], -1)
    levels = _buffer("levels", flat.shape[0], tuple(flat.shape[1:]), torch.float32, flat.device)
    levels.copy_(flat)
    logits = exact_logits(levels, classifier.weights, classifier.bias)
    x = scaled_pixels(stacked, levels)  # the logits are made: the levels may be divided
    ideals = classifier.ideals.reshape(classifier.ideals.shape[0], -1)
    l1, l2 = distances(x, ideals)
    dist_l1, pred_l1 = l1.min(1)
    dist_l2, pred_l2 = l2.min(1)
    probs = torch.softmax(logits, dim=1)
    prob_sgd, pred_sgd = probs.max(1)
    return Scores(
        pred_l1.cpu(), pred_l2.cpu(), pred_sgd.cpu(), dist_l1.cpu(), dist_l2.cpu(), prob_sgd.cpu()
    )


def to_device(stack: np.ndarray, device: torch.device) -> torch.Tensor:
    """Host stack to the scoring device: on the CPU the NumPy buffer itself, elsewhere one
    plain copy. Pinning would cost a page-locked buffer and a host copy per batch and buy
    nothing: the first kernel needs the pixels at once, and a batch's 3 MiB are a small part
    of decoding it."""
    tensor = torch.from_numpy(stack)
    if device.type == "cpu":
        return tensor
    return tensor.to(device)


def score_stack(classifier: Classifier, stack: np.ndarray, device: torch.device) -> Scores:
    """Score a host ``N x H x W`` uint8 stack on ``device`` (where the classifier already
    is), all at once: :func:`distances` keeps its temporaries small."""
    return score_tensor(classifier, to_device(stack, device))


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
