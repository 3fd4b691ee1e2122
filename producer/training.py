"""Training both models from labelled class folders (``DIR/3/*.png``, ``DIR/7/*.png``...)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from producer.files import DirectoryError, DirectoryWalk, check_directory, read_file
from worker.classifier import Classifier
from worker.ideal import ideal_images
from worker.images import ImageError, decode_gray, image_size
from worker.scoring import score_batch
from worker.sgd import EpochStats, train_sgd


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
    scores = score_batch(clf, data.stack)
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
