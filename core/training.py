"""Training both models from labelled class folders (``DIR/3/*.png``, ``DIR/7/*.png``...).

The ideal digits are each class's mean image. The linear model is chapter 4's SGD loop (init,
predict, loss, gradient, step, repeat) generalised from two classes to any number: the loss
is softmax cross-entropy over ``K`` outputs rather than the chapter's sigmoid + ``mnist_loss``,
so one model serves 3-vs-7 and all ten digits alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from core.classifier import Classifier
from core.errors import DirectoryError
from core.files import DirectoryWalk, check_directory, read_file
from core.images import ImageError, decode_gray, image_size
from core.scoring import linear, score_tensor


def ideal_image(stacked: torch.Tensor) -> torch.Tensor:
    """The mean of a ``N x H x W`` uint8 stack: ``stack.float()/255`` then ``mean(0)``."""
    if stacked.shape[0] == 0:
        raise ValueError("cannot average an empty stack of images")
    return (stacked.float() / 255).mean(0)


def ideal_images(stacked: torch.Tensor, labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """One ideal image per class, ``K x H x W``, from images labelled ``0..K-1``."""
    return torch.stack([ideal_image(stacked[labels == k]) for k in range(n_classes)])


@dataclass(frozen=True)
class EpochStats:
    epoch: int
    loss: float
    accuracy: float


def init_params(n_inputs: int, n_classes: int, generator: torch.Generator):
    weights = (torch.randn(n_inputs, n_classes, generator=generator) * 0.01).requires_grad_()
    bias = torch.zeros(n_classes).requires_grad_()
    return weights, bias


def train_sgd(
    x: torch.Tensor,
    y: torch.Tensor,
    n_classes: int,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    on_epoch: Callable[[EpochStats], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Train on ``x`` (``N x D`` floats 0-1) and labels ``y`` (``N``, 0..K-1).

    Returns ``weights`` (``D x K``) and ``bias`` (``K``). The same seed and data give the
    same parameters bit for bit: initialisation and shuffling draw from one seeded generator.
    """
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise ValueError("epochs and batch size must be at least 1 and the learning rate > 0")
    generator = torch.Generator().manual_seed(seed)
    weights, bias = init_params(x.shape[1], n_classes, generator)
    n = x.shape[0]
    for epoch in range(1, epochs + 1):
        order = torch.randperm(n, generator=generator)
        total_loss = 0.0
        correct = 0
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            xb, yb = x[idx], y[idx]
            logits = linear(xb, weights, bias)  # predict
            loss = F.cross_entropy(logits, yb)  # loss
            loss.backward()  # gradient
            with torch.no_grad():  # step
                weights -= lr * weights.grad
                bias -= lr * bias.grad
                weights.grad.zero_()
                bias.grad.zero_()
            total_loss += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == yb).sum())
        if on_epoch is not None:
            on_epoch(EpochStats(epoch, total_loss / n, correct / n))
    return weights.detach(), bias.detach()


@dataclass
class LabelledImages:
    stack: torch.Tensor  # N x H x W uint8
    labels: torch.Tensor  # N int64, index into classes
    classes: tuple[str, ...]
    n_unreadable: int


def class_sort_key(name: str) -> tuple[int, int | str]:
    return (0, int(name)) if name.isdigit() else (1, name)


def load_labelled(root: Path, classes: tuple[str, ...] | None = None) -> LabelledImages:
    """Every image in ``root/<class>/`` (recursively), labelled by its class folder.

    With ``classes`` given (a validation set), only those folders are read, in that order.
    The image size is taken from the first image; images that cannot be decoded, or have
    another size, are counted in ``n_unreadable`` and left out.
    """
    root = check_directory(root)
    folders = sorted((p.name for p in root.iterdir() if p.is_dir()), key=class_sort_key)
    if classes is None:
        classes = tuple(folders)
        if len(classes) < 2:
            raise DirectoryError(
                f"{str(root)!r} needs at least two class folders (e.g. {root}/3 and {root}/7)"
            )
    images: list[np.ndarray] = []
    labels: list[int] = []
    size: tuple[int, int] | None = None
    unreadable = 0
    for k, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir():
            continue
        for path, _rel in DirectoryWalk(folder):
            data, _err = read_file(path)
            if data is None:
                unreadable += 1
                continue
            try:
                if size is None:  # the first image fixes the model's size
                    size = image_size(data)
                images.append(decode_gray(data, *size))
            except (ImageError, OSError):
                unreadable += 1
                continue
            labels.append(k)
    if not images:
        raise DirectoryError(f"no readable images in the class folders of {str(root)!r}")
    return LabelledImages(
        torch.from_numpy(np.stack(images)), torch.tensor(labels), tuple(classes), unreadable
    )


def require_every_class(data: LabelledImages, root: Path) -> None:
    """Training needs at least one image per class, or that class has no ideal image."""
    counts = torch.bincount(data.labels, minlength=len(data.classes)).tolist()
    empty = [c for c, n in zip(data.classes, counts, strict=True) if n == 0]
    if empty:
        raise DirectoryError(
            f"class folder(s) {', '.join(map(repr, empty))} of {str(root)!r} hold no readable "
            "images: add images or remove the folder"
        )


def accuracies(clf: Classifier, data: LabelledImages) -> dict[str, float]:
    scores = score_tensor(clf, data.stack)
    return {
        name: float((pred == data.labels).float().mean())
        for name, pred in (("l1", scores.pred_l1), ("l2", scores.pred_l2), ("sgd", scores.pred_sgd))
    }


def holdout_split(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_valid = max(1, int(round(n * fraction)))
    return order[n_valid:], order[:n_valid]


def fit(
    train: LabelledImages,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    on_epoch: Callable[[EpochStats], None] | None = None,
) -> Classifier:
    k = len(train.classes)
    ideals = ideal_images(train.stack, train.labels, k)
    x = (train.stack.float() / 255).reshape(len(train.stack), -1)
    weights, bias = train_sgd(
        x,
        train.labels,
        k,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        on_epoch=on_epoch,
    )
    return Classifier(train.classes, ideals, weights, bias)


def subset(data: LabelledImages, idx: torch.Tensor) -> LabelledImages:
    return LabelledImages(data.stack[idx], data.labels[idx], data.classes, 0)
