"""Scoring one stacked batch against a classifier: the arithmetic, nothing else."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from worker.classifier import Classifier
from worker.ideal import distances
from worker.sgd import linear


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
def score_batch(classifier: Classifier, stacked: torch.Tensor) -> Scores:
    """Score a ``N x H x W`` uint8 stack (on the classifier's device); results on the CPU."""
    x = stacked.float().div_(255).reshape(stacked.shape[0], -1)  # one temporary, same bits
    ideals = classifier.ideals.reshape(classifier.ideals.shape[0], -1)
    l1, l2 = distances(x, ideals)
    dist_l1, pred_l1 = l1.min(1)
    dist_l2, pred_l2 = l2.min(1)
    probs = torch.softmax(linear(x, classifier.weights, classifier.bias), dim=1)
    prob_sgd, pred_sgd = probs.max(1)
    return Scores(
        pred_l1.cpu(), pred_l2.cpu(), pred_sgd.cpu(), dist_l1.cpu(), dist_l2.cpu(), prob_sgd.cpu()
    )
