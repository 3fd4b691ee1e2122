"""The trained classifier a worker scores with: ideal digits plus a linear SGD model; and
how a model is stored, without pickle: its class names as a JSON list of strings, its arrays
as float32 little-endian bytes with the shape kept in plain columns. NumPy and torch are
imported only where an array or a tensor is made, so that enqueuing and reports (class
names, pictures of the model) never import torch."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from core.errors import ModelDamaged

if TYPE_CHECKING:
    import numpy as np
    import torch

T = TypeVar("T")


@dataclass(frozen=True)
class Classifier:
    """Everything needed to score a batch.

    ``classes[k]`` names row ``k`` of ``ideals`` (``K x H x W``, pixel values 0-1: images of
    ``H x W`` are scored) and column ``k`` of ``weights`` (``H*W x K``); ``bias`` has ``K``
    entries.
    """

    classes: tuple[str, ...]
    ideals: torch.Tensor
    weights: torch.Tensor
    bias: torch.Tensor

    def to(self, device: torch.device | str) -> Classifier:
        return Classifier(
            self.classes,
            self.ideals.to(device),
            self.weights.to(device),
            self.bias.to(device),
        )


def tensor_to_bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().float().contiguous().numpy().astype("<f4").tobytes()


def read_stored(model_id: int, column: str, decode: Callable[[], T]) -> T:
    """``decode()`` of one stored column of a model, or :class:`ModelDamaged` naming the
    model, the column and what is wrong with it, in one line."""
    try:
        return decode()
    except (ValueError, TypeError) as e:
        raise ModelDamaged(
            f"model {model_id} is damaged: its {column} cannot be read ({e}); it cannot "
            "score: train a model again (`producer train DIR`) and submit with its id"
        ) from None


def classes_to_json(classes: tuple[str, ...]) -> str:
    return json.dumps(list(classes))


def classes_from_json(text: str) -> tuple[str, ...]:
    value = json.loads(text)
    if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
        raise ValueError("stored classes must be a JSON list of strings")
    return tuple(value)


def array_from_bytes(data: bytes, shape: tuple[int, ...]) -> np.ndarray:
    import numpy as np

    array = np.frombuffer(data, dtype="<f4")
    expected = int(np.prod(shape))
    if array.size != expected:
        raise ValueError(f"stored tensor has {array.size} values, expected {expected} {shape}")
    return array.astype(np.float32).reshape(shape)
