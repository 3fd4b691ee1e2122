"""Training both models from labelled class folders (``DIR/3/*.png``, ``DIR/7/*.png``...).

The ideal digits are each class's mean image. The linear model is chapter 4's SGD loop (init,
predict, loss, gradient, step, repeat) generalised from two classes to any number: the loss
is softmax cross-entropy over ``K`` outputs rather than the chapter's sigmoid + ``mnist_loss``,
so one model serves 3-vs-7 and all ten digits alike. So that the defaults find the linear
model's best on data they were not tuned on, it trains on centred inputs with momentum and a
cosine learning rate, one copy per weight decay side by side, and keeps the epoch and weight
decay that do best on validation images, folded back to weights for raw pixels.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from core import defaults
from core.classifier import Classifier
from core.curve import EpochStats
from core.errors import BadInput
from core.labelled import LabelledImages
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
class SgdSettings:
    """How the linear model is trained; the defaults are the ``producer train`` defaults.

    Each weight decay in ``weight_decays`` trains its own copy of the model on the same
    mini-batches, side by side in one matrix; validation chooses among them.
    """

    epochs: int = defaults.EPOCHS
    lr: float = defaults.LEARNING_RATE
    #: images per mini-batch; ``None``: :func:`auto_batch_size` of the training images
    batch_size: int | None = None
    seed: int = defaults.SEED
    weight_decays: tuple[float, ...] = defaults.WEIGHT_DECAYS
    momentum: float = defaults.MOMENTUM
    #: stop after this many epochs without a better validation epoch; ``None``: never
    patience: int | None = defaults.PATIENCE

    def check(self) -> None:
        if self.epochs < 1 or (self.batch_size or 1) < 1 or self.lr <= 0:
            raise BadInput("epochs and batch size must be at least 1 and the learning rate > 0")
        if not self.weight_decays or min(self.weight_decays) < 0:
            raise BadInput("give at least one weight decay, each >= 0")
        if not 0 <= self.momentum < 1:
            raise BadInput("momentum must be in [0, 1)")
        if self.patience is not None and self.patience < 1:
            raise BadInput("patience must be at least 1 epoch")


@dataclass(frozen=True)
class LinearFit:
    """The kept weights (``D x K``) and bias (``K``) for raw inputs (pixels / 255), the epoch
    and weight decay they are from, and the learning curve of that weight decay's copy: its
    figures at every epoch run, so that the curve is of one model, not stitched from the
    copy that led each epoch."""

    weights: torch.Tensor
    bias: torch.Tensor
    best_epoch: int
    weight_decay: float
    batch_size: int
    curve: tuple[EpochStats, ...]


def auto_batch_size(n: int) -> int:
    """At least 64 mini-batches an epoch while they hold 64 to 256 images: small training
    sets need the steps to converge, large ones the throughput of larger batches."""
    return min(defaults.TRAIN_BATCH_SIZE_MAX, max(defaults.TRAIN_BATCH_SIZE_MIN, n // 64))


def input_scaling(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-input mean and one scale for all inputs: ``(x - mean) / scale`` is centred with a
    mean square of 1, so one learning rate suits dark and bright images alike. One scale, not
    one per pixel, so that a pixel that is almost always blank is not magnified."""
    mean = x.mean(0)
    scale = (x - mean).square().mean().sqrt().clamp_min(1e-6)
    return mean, scale


def largest_variance(z: torch.Tensor, iterations: int = 30, rows: int = 10_000) -> float:
    """The largest eigenvalue of the covariance of centred inputs ``z``: the variance along
    the direction in which they vary most, which the loss's steepest curvature grows with.
    Power iteration from a fixed start on at most ``rows`` evenly spaced rows, so the same
    data give the same value; 1.0 for inputs that do not vary."""
    sample = z[:: max(1, len(z) // rows)]
    vector = torch.full((z.shape[1],), z.shape[1] ** -0.5)
    value = 0.0
    for _ in range(iterations):
        product = sample.T @ (sample @ vector) / len(sample)
        value = float(product.norm())
        if value == 0:
            return 1.0
        vector = product / value
    return value


def fold_scaling(
    weights: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights for raw inputs from weights trained on ``(x - mean) / scale``: the same logits,
    ``((x - mean) / scale) @ W + b == x @ (W / scale) + (b - (mean / scale) @ W)``."""
    return weights / scale, bias - (mean / scale) @ weights


def cosine_lr(lr: float, step: int, total_steps: int) -> float:
    """The learning rate at ``step`` of ``total_steps``: from ``lr`` down to 0 on a half cosine."""
    return lr * 0.5 * (1 + math.cos(math.pi * step / total_steps))


def validation_figures(
    x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, bias: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per model side by side (``weights`` is ``D x (G*K)``): the cross-entropy and accuracy
    on raw inputs ``x``, each model predicting as core/scoring.py does."""
    logits = linear(x, weights, bias).view(len(x), -1, k)  # N x G x K
    _prob, pred = torch.softmax(logits, dim=2).max(2)
    picked = torch.log_softmax(logits, dim=2).gather(
        2, y[:, None, None].expand(-1, pred.shape[1], 1)
    )
    return -picked.mean((0, 2)), (pred == y[:, None]).float().mean(0)


class SideBySide:
    """One linear model per weight decay, trained on the same mini-batches as one ``D x
    (G*K)`` matrix: the columns of model ``g`` are ``g*K .. g*K+K-1``."""

    def __init__(
        self, d: int, k: int, weight_decays: tuple[float, ...], generator: torch.Generator
    ) -> None:
        self.k, self.g = k, len(weight_decays)
        self.weights = torch.randn(d, k, generator=generator).mul_(0.01).repeat(1, self.g)
        self.bias = torch.zeros(self.g * k)
        self.decay = torch.tensor(weight_decays).repeat_interleave(k)  # per column
        self.v_weights = torch.zeros_like(self.weights)
        self.v_bias = torch.zeros_like(self.bias)

    def step(
        self, xb: torch.Tensor, yb: torch.Tensor, lr: float, momentum: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One SGD step of every model on a mini-batch; returns each model's summed
        cross-entropy and number right on it, before the step."""
        b = len(yb)
        logits = linear(xb, self.weights, self.bias).view(b, self.g, self.k)  # predict
        log_probs = torch.log_softmax(logits, dim=2)
        one_hot = F.one_hot(yb, self.k)[:, None, :]  # B x 1 x K
        loss = -(log_probs * one_hot).sum((0, 2))  # loss
        correct = (logits.argmax(2) == yb[:, None]).sum(0)
        # gradient of the mean cross-entropy: (softmax - one-hot) / batch
        grad = log_probs.exp_().sub_(one_hot).div_(b).view(b, self.g * self.k)
        self.v_weights.mul_(momentum).add_(xb.T @ grad).addcmul_(self.weights, self.decay)
        self.v_bias.mul_(momentum).add_(grad.sum(0))
        self.weights.sub_(self.v_weights, alpha=lr)  # step
        self.bias.sub_(self.v_bias, alpha=lr)
        return loss, correct

    def columns(self, i: int) -> slice:
        return slice(i * self.k, (i + 1) * self.k)


def train_sgd(
    x: torch.Tensor,
    y: torch.Tensor,
    n_classes: int,
    settings: SgdSettings,
    *,
    valid: tuple[torch.Tensor, torch.Tensor] | None = None,
    on_epoch: Callable[[EpochStats], None] | None = None,
) -> LinearFit:
    """Train on ``x`` (``N x D`` floats 0-1) and labels ``y`` (``N``, 0..K-1).

    Mini-batch SGD with momentum on softmax cross-entropy, on centred and scaled inputs (see
    :func:`input_scaling`), the learning rate following a cosine from ``settings.lr`` to 0
    over ``settings.epochs``, divided by the inputs' :func:`largest_variance`, one model per
    weight decay (an L2 penalty on the weights; :class:`SideBySide`). With ``valid`` (raw
    inputs and labels), the weights kept are those of the epoch and weight decay with the
    best validation accuracy (ties: the lower validation loss, then the earlier epoch and the
    first weight decay), and training stops after ``patience`` epochs without a better one;
    without, there must be one weight decay, and the last epoch is kept. ``on_epoch`` sees
    each epoch's leading copy; the curve returned is the kept copy's, every epoch. The kept
    weights are folded back to raw inputs, so the model scores ``pixels / 255`` exactly as
    core/scoring.py does.

    The same seed and data give the same parameters bit for bit: initialisation and shuffling
    draw from one seeded generator.
    """
    settings.check()
    if valid is None and len(settings.weight_decays) > 1:
        raise BadInput("choosing among weight decays needs validation data")
    generator = torch.Generator().manual_seed(settings.seed)
    n, d = x.shape
    batch_size = settings.batch_size or auto_batch_size(n)
    models = SideBySide(d, n_classes, settings.weight_decays, generator)
    mean, scale = input_scaling(x)
    z = (x - mean) / scale
    # the rate divided by the steepest curvature's scale suits few inputs and many alike
    step_scale = 1.0 / largest_variance(z)
    total_steps = settings.epochs * math.ceil(n / batch_size)
    step = 0
    best_of_epoch: list[EpochStats] = []  # what the kept epoch is chosen among
    by_decay: list[list[EpochStats]] = [[] for _ in settings.weight_decays]
    kept: LinearFit | None = None
    kept_decay = 0
    for epoch in range(1, settings.epochs + 1):
        epoch_lr = cosine_lr(settings.lr, step, total_steps)
        order = torch.randperm(n, generator=generator)
        total_loss = torch.zeros(models.g, dtype=torch.float64)
        correct = torch.zeros(models.g, dtype=torch.int64)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            lr = step_scale * cosine_lr(settings.lr, step, total_steps)
            batch_loss, batch_correct = models.step(z[idx], y[idx], lr, settings.momentum)
            total_loss += batch_loss
            correct += batch_correct
            step += 1
        raw_weights, raw_bias = fold_scaling(models.weights, models.bias, mean, scale)
        i, losses, accuracy = 0, None, None
        if valid is not None:
            losses, accuracy = validation_figures(*valid, raw_weights, raw_bias, n_classes)
            i = max(range(models.g), key=lambda j: (float(accuracy[j]), -float(losses[j]), -j))
        for j, decay in enumerate(settings.weight_decays):
            by_decay[j].append(EpochStats(
                epoch,
                float(total_loss[j]) / n,
                int(correct[j]) / n,
                None if losses is None else float(losses[j]),
                None if accuracy is None else float(accuracy[j]),
                epoch_lr,
                decay,
            ))
        stats = by_decay[i][-1]
        best_so_far = None if kept is None else best_of_epoch[kept.best_epoch - 1]
        if valid is None or best_so_far is None or stats.rank() > best_so_far.rank():
            cols = models.columns(i)
            kept = LinearFit(
                raw_weights[:, cols], raw_bias[cols], epoch, stats.weight_decay, batch_size, ()
            )
            kept_decay = i
        best_of_epoch.append(stats)
        if on_epoch is not None:
            on_epoch(stats)
        patience = settings.patience
        if valid is not None and patience is not None and kept is not None and (
            epoch - kept.best_epoch >= patience
        ):
            break
    assert kept is not None  # settings.check(): at least one epoch
    return replace(kept, curve=tuple(by_decay[kept_decay]))


def accuracies(clf: Classifier, data: LabelledImages) -> dict[str, float]:
    scores = score_tensor(clf, data.stack)
    return {
        name: float((pred == data.labels).float().mean())
        for name, pred in (("l1", scores.pred_l1), ("l2", scores.pred_l2), ("sgd", scores.pred_sgd))
    }


def flat_pixels(data: LabelledImages) -> torch.Tensor:
    """``N x (H*W)`` floats 0-1, as core/scoring.py makes them."""
    return (data.stack.float() / 255).reshape(len(data.stack), -1)


@dataclass(frozen=True)
class TrainedModel:
    """Both models, and how the linear one was trained (:class:`LinearFit`'s figures)."""

    classifier: Classifier
    best_epoch: int
    weight_decay: float
    batch_size: int
    curve: tuple[EpochStats, ...]


def train_model(
    train: LabelledImages,
    settings: SgdSettings,
    *,
    valid: LabelledImages | None = None,
    on_epoch: Callable[[EpochStats], None] | None = None,
) -> TrainedModel:
    """Both models from ``train``: the ideal images, and the linear model whose epoch is
    chosen on ``valid`` (see :func:`train_sgd`)."""
    k = len(train.classes)
    ideals = ideal_images(train.stack, train.labels, k)
    linear_fit = train_sgd(
        flat_pixels(train),
        train.labels,
        k,
        settings,
        valid=None if valid is None else (flat_pixels(valid), valid.labels),
        on_epoch=on_epoch,
    )
    clf = Classifier(
        train.classes, ideals, linear_fit.weights.contiguous(), linear_fit.bias.contiguous()
    )
    return TrainedModel(
        clf, linear_fit.best_epoch, linear_fit.weight_decay, linear_fit.batch_size, linear_fit.curve
    )


def fit(
    train: LabelledImages,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    on_epoch: Callable[[EpochStats], None] | None = None,
) -> Classifier:
    """Both models, the linear one trained for exactly ``epochs`` epochs (no validation)."""
    settings = SgdSettings(
        epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, weight_decays=(0.0,)
    )
    return train_model(train, settings, on_epoch=on_epoch).classifier
