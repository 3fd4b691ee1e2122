"""Naive Celery, what a user writes first: one task per image, which reads the file, scores it
with the same models and writes one row. Celery's defaults otherwise (JSON, early acks).

    celery -A bench.naive_celery worker --concurrency 2

Settings come from the environment: ``NAIVE_BROKER_URL``, ``NAIVE_QUEUE``, ``NAIVE_MODEL_DB``
and ``NAIVE_MODEL_ID`` (where the model is stored), ``NAIVE_RESULTS`` (an SQLite file with a
``results`` table) and ``NAIVE_DEVICE``.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import numpy as np
import torch
from celery import Celery
from PIL import Image

from core.classifier import Classifier
from core.scoring import score_tensor
from db.model_store import load_classifier
from db.session import get_engine

app = Celery("naive", broker=os.environ.get("NAIVE_BROKER_URL", "redis://127.0.0.1:6379/8"))
app.conf.task_default_queue = os.environ.get("NAIVE_QUEUE", "naive")
app.conf.task_ignore_result = True

RESULTS_TABLE = (
    "CREATE TABLE IF NOT EXISTS results (path TEXT, label TEXT, pred_l1 TEXT, pred_l2 TEXT, "
    "pred_sgd TEXT, dist_l1 REAL, dist_l2 REAL, prob_sgd REAL)"
)
_classifier: Classifier | None = None


def classifier() -> Classifier:
    """Loaded once per worker process, on its first task."""
    global _classifier
    if _classifier is None:
        with get_engine(os.environ["NAIVE_MODEL_DB"]).connect() as conn:
            model = load_classifier(conn, int(os.environ["NAIVE_MODEL_ID"]))
        _classifier = model.to(os.environ.get("NAIVE_DEVICE", "cpu"))
    return _classifier


@app.task(name="naive.score_image")
def score_image(path: str) -> None:
    clf = classifier()
    pixels = np.array(Image.open(path))
    s = score_tensor(clf, torch.from_numpy(pixels[None]).to(clf.ideals.device))
    names = clf.classes
    label = Path(path).parent.name
    db = sqlite3.connect(os.environ["NAIVE_RESULTS"], timeout=60)
    with db:
        db.execute(
            "INSERT INTO results VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (path, label if label in names else None, names[int(s.pred_l1[0])],
             names[int(s.pred_l2[0])], names[int(s.pred_sgd[0])], float(s.dist_l1[0]),
             float(s.dist_l2[0]), float(s.prob_sgd[0])),
        )
    db.close()
