"""The linear model over the pixels, trained with mini-batch stochastic gradient descent.

This is chapter 4's loop (init, predict, loss, gradient, step, repeat) generalised from two
classes to any number: the loss is softmax cross-entropy over ``K`` outputs rather than the
chapter's sigmoid + ``mnist_loss``, so one model serves 3-vs-7 and all ten digits alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class EpochStats:
    epoch: int
    loss: float
    accuracy: float


def init_params(n_inputs: int, n_classes: int, generator: torch.Generator):
    weights = (torch.randn(n_inputs, n_classes, generator=generator) * 0.01).requires_grad_()
    bias = torch.zeros(n_classes).requires_grad_()
    return weights, bias


def linear(x: torch.Tensor, weights: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return x @ weights + bias


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
