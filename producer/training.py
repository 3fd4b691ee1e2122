"""``producer train`` as a plain function: read the class folders, train with one line of
progress per epoch on stderr, then store the model and its learning curve in one transaction.

Every check of the input happens before training starts, and nothing is written before
training ends, so bad input or an interrupted run leaves no model behind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from core import defaults
from core.curve import EpochStats, curve_to_json
from core.labelled import (
    LabelledImages,
    few_validation_images,
    holdout_split,
    load_labelled,
    subset,
)
from core.text import plural
from core.training import SgdSettings, accuracies, train_model
from db.model_store import TrainingRecord, save_classifier
from producer.progress import bar


def split_data(
    directory: Path, valid_dir: Path | None, holdout: float, seed: int
) -> tuple[LabelledImages, LabelledImages, int]:
    """Training and validation images, and the files of both that could not be used."""
    data = load_labelled(directory)
    if valid_dir is not None:
        size = (int(data.stack.shape[1]), int(data.stack.shape[2]))
        valid = load_labelled(valid_dir, data.classes, size)
        return data, valid, data.n_unreadable + valid.n_unreadable
    train_idx, valid_idx = holdout_split(data, holdout, seed, directory)
    return subset(data, train_idx), subset(data, valid_idx), data.n_unreadable


def few_images_warning(valid: LabelledImages) -> str | None:
    """A warning line when some class has too few validation images for its accuracy (and
    so the epoch and weight decay kept) to mean much; ``None`` when every class has enough."""
    few = few_validation_images(valid, defaults.MIN_VALID_PER_CLASS)
    if not few:
        return None
    counts = ", ".join(f"{plural(n, 'image')} of class {c!r}" for c, n in few)
    return (
        f"warning: only {counts} to validate on (fewer than {defaults.MIN_VALID_PER_CLASS} "
        "per class): the validation accuracy, and the epoch and weight decay it picks, rest "
        "on too few images; add images, or validate on more with --valid DIR"
    )


def epoch_line(stats: EpochStats, epochs: int, best: bool) -> str:
    """One epoch's progress, a bar of the epochs first; ``*`` marks the best epoch so far."""
    valid = (
        ""
        if stats.valid_accuracy is None
        else f"  valid accuracy {stats.valid_accuracy:.4f} (weight decay {stats.weight_decay:g})"
    )
    return (
        f"{bar(stats.epoch, epochs, 20)} epoch {stats.epoch:>3}/{epochs}  lr {stats.lr:.4f}  "
        f"loss {stats.loss:.4f}  "
        f"train accuracy {stats.train_accuracy:.4f}{valid}{'  *' if best else ''}"
    )


def train_and_store(
    engine: Any, directory: Path, valid_dir: Path | None, holdout: float, settings: SgdSettings
) -> int:
    """Train on ``directory``, choose the epoch on ``valid_dir`` (or a held-out ``holdout``
    fraction), store the model; returns its id. Progress goes to stderr, results to stdout."""
    settings.check()
    train, valid, n_unreadable = split_data(directory, valid_dir, holdout, settings.seed)
    if n_unreadable:
        click.echo(
            f"warning: {plural(n_unreadable, 'file')} could not be read or decoded and "
            f"{'was' if n_unreadable == 1 else 'were'} left out",
            err=True,
        )
    n_valid = plural(len(valid.labels), "image")
    source = (
        f"{n_valid} of {valid_dir}"
        if valid_dir is not None
        else f"{n_valid} held out of {directory} (--holdout {holdout})"
    )
    click.echo(
        f"training on {plural(len(train.labels), 'image')} of classes "
        f"{', '.join(train.classes)}; validating on {source}",
        err=True,
    )
    warning = few_images_warning(valid)
    if warning:
        click.echo(warning, err=True)
    best: list[EpochStats] = []

    def on_epoch(stats: EpochStats) -> None:
        better = not best or stats.rank() > best[0].rank()  # the rule train_sgd keeps by
        if better:
            best[:] = [stats]
        click.echo(epoch_line(stats, settings.epochs, better), err=True)

    trained = train_model(train, settings, valid=valid, on_epoch=on_epoch)
    if len(trained.curve) < settings.epochs:
        epochs = plural(settings.patience or 0, "epoch")
        click.echo(f"stopped early: no better validation accuracy in {epochs}", err=True)
    acc = accuracies(trained.classifier, valid)
    record = TrainingRecord(
        train_dir=str(directory.resolve()),
        n_train=len(train.labels),
        n_valid=len(valid.labels),
        epochs=settings.epochs,
        lr=settings.lr,
        batch_size=trained.batch_size,
        seed=settings.seed,
        accuracy_l1=acc["l1"],
        accuracy_l2=acc["l2"],
        accuracy_sgd=acc["sgd"],
        weight_decay=trained.weight_decay,
        best_epoch=trained.best_epoch,
        learning_curve=curve_to_json(trained.curve),
    )
    with engine.begin() as conn:
        model_id = save_classifier(conn, trained.classifier, record)
    click.echo(
        f"kept the SGD weights of epoch {trained.best_epoch} (weight decay "
        f"{trained.weight_decay:g}, batch size {trained.batch_size}): the best on validation",
        err=True,
    )
    click.echo(f"model {model_id}")
    click.echo(
        f"validation accuracy on {plural(len(valid.labels), 'image')}:  "
        f"L1 {acc['l1']:.4f}  L2 {acc['l2']:.4f}  SGD {acc['sgd']:.4f}"
    )
    return model_id
