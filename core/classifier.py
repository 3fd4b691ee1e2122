"""The trained classifier a worker scores with: ideal digits plus a linear SGD model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # numpy and torch are imported where a tensor is made: a report needs none
    import torch

from core.storage import array_from_bytes


class ImageSize:
    """The image size of a model whose ``ideals`` are ``K x H x W``, tensors or arrays."""

    ideals: Any

    @property
    def height(self) -> int:
        return int(self.ideals.shape[1])

    @property
    def width(self) -> int:
        return int(self.ideals.shape[2])


@dataclass(frozen=True)
class Classifier(ImageSize):
    """Everything needed to score a batch.

    ``classes[k]`` names row ``k`` of ``ideals`` (``K x H x W``, pixel values 0-1) and column
    ``k`` of ``weights`` (``H*W x K``); ``bias`` has ``K`` entries.
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


# Storage without pickle: float32 little-endian bytes plus the shape kept in plain columns.


def tensor_to_bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().float().contiguous().numpy().astype("<f4").tobytes()


def tensor_from_bytes(data: bytes, shape: tuple[int, ...]) -> torch.Tensor:
    import torch

    return torch.from_numpy(array_from_bytes(data, shape))

