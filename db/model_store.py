"""Storing trained classifiers in the ``models`` table and loading them back, without pickle."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

from sqlalchemy import Connection, func, insert, select

from core.classifier import (
    Classifier,
    array_from_bytes,
    classes_from_json,
    classes_to_json,
    read_stored,
    tensor_to_bytes,
)
from core.curve import EpochStats, curve_from_json
from core.errors import ModelNotFound
from db.models import models, utcnow

LOSS_NAME = "softmax_cross_entropy"


@dataclass(frozen=True)
class TrainingRecord:
    train_dir: str
    n_train: int
    n_valid: int
    epochs: int
    lr: float
    batch_size: int
    seed: int
    accuracy_l1: float | None
    accuracy_l2: float | None
    accuracy_sgd: float | None
    weight_decay: float | None = None
    best_epoch: int | None = None
    #: JSON text, one object per epoch (:func:`core.training.curve_to_json`)
    learning_curve: str | None = None


def save_classifier(conn: Connection, clf: Classifier, record: TrainingRecord) -> int:
    _, height, width = clf.ideals.shape
    return conn.execute(
        insert(models)
        .values(
            created_at=utcnow(),
            classes=classes_to_json(clf.classes),
            height=height,
            width=width,
            loss=LOSS_NAME,
            ideal_images=tensor_to_bytes(clf.ideals),
            sgd_weights=tensor_to_bytes(clf.weights),
            sgd_bias=tensor_to_bytes(clf.bias),
            **record.__dict__,
        )
        .returning(models.c.id)
    ).scalar_one()


def resolve_model_id(conn: Connection, model_id: int | None) -> int:
    """The given model id if it exists, else the newest model's id."""
    if model_id is None:
        newest = conn.execute(select(func.max(models.c.id))).scalar_one_or_none()
        if newest is None:
            raise ModelNotFound("no model trained yet: run `producer train DIR` first")
        return int(newest)
    found = conn.execute(select(models.c.id).where(models.c.id == model_id)).scalar_one_or_none()
    if found is None:
        raise ModelNotFound(
            f"model {model_id} does not exist: see `producer models`, or run `producer train DIR`"
        )
    return model_id


def load_classifier(conn: Connection, model_id: int, device: Any = "cpu") -> Classifier:
    """Model ``model_id``, its tensors on ``device`` (a ``torch.device`` or its name)."""
    import torch

    row = conn.execute(select(models).where(models.c.id == model_id)).mappings().first()
    if row is None:
        raise ModelNotFound(
            f"model {model_id} does not exist: see `producer models`, or run `producer train DIR`"
        )
    classes = read_stored(model_id, "classes", partial(classes_from_json, row["classes"]))
    k, h, w = len(classes), row["height"], row["width"]
    tensors = []  # the ideals, the weights and the bias, in the Classifier's order
    for column, shape in (("ideal_images", (k, h, w)), ("sgd_weights", (h * w, k)),
                          ("sgd_bias", (k,))):
        array = read_stored(model_id, column, partial(array_from_bytes, row[column], shape))
        tensors.append(torch.from_numpy(array).to(device))
    return Classifier(classes, *tensors)


def load_learning_curve(
    conn: Connection, model_id: int
) -> tuple[tuple[EpochStats, ...], int | None]:
    """The model's learning curve and the epoch kept; ``()`` and ``None`` for a model stored
    without them."""
    row = conn.execute(
        select(models.c.learning_curve, models.c.best_epoch).where(models.c.id == model_id)
    ).first()
    if row is None or row.learning_curve is None:
        return (), None
    return curve_from_json(row.learning_curve), row.best_epoch


def list_models(conn: Connection) -> list[dict[str, Any]]:
    cols = [c for c in models.c if c.name not in ("ideal_images", "sgd_weights", "sgd_bias")]
    rows = conn.execute(select(*cols).order_by(models.c.id.desc())).mappings()
    return [dict(r) for r in rows]
