"""The learning curve of a training run: one :class:`EpochStats` per epoch, stored with the
model as JSON. Torch-free, so that reading a model's description needs no torch."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class EpochStats:
    """One epoch of training of one weight decay's copy of the SGD model:
    ``loss`` and ``train_accuracy`` over the epoch's mini-batches, the validation figures of
    the weights at its end (``None`` without validation data), and the learning rate at the
    epoch's start."""

    epoch: int
    loss: float
    train_accuracy: float
    valid_loss: float | None
    valid_accuracy: float | None
    lr: float
    weight_decay: float

    def rank(self) -> tuple[float, float]:
        """Higher is better: validation accuracy, then the lower validation loss."""
        if self.valid_accuracy is None or self.valid_loss is None:
            return (-math.inf, -math.inf)
        return (self.valid_accuracy, -self.valid_loss)

    def as_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


def curve_to_json(curve: tuple[EpochStats, ...]) -> str:
    return json.dumps([stats.as_dict() for stats in curve])


def curve_from_json(text: str) -> tuple[EpochStats, ...]:
    return tuple(EpochStats(**item) for item in json.loads(text))
