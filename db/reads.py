"""Reads that reports need beyond db/views.py: a model's classes, a run's batches, its
failures grouped by reason."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, func, select

from core.classifier import classes_from_json
from db.models import Batch, Model, Prediction


def model_classes(conn: Connection, model_id: int) -> list[str]:
    text = conn.execute(select(Model.classes).where(Model.id == model_id)).scalar_one()
    return list(classes_from_json(text))


def batch_timings(conn: Connection, run_id: int) -> list[Any]:
    """Each batch's status, deliveries, enqueued_at and finished_at."""
    return list(
        conn.execute(
            select(Batch.status, Batch.deliveries, Batch.enqueued_at, Batch.finished_at).where(
                Batch.run_id == run_id
            )
        )
    )


def failure_reasons(conn: Connection, run_id: int) -> list[dict[str, Any]]:
    n = func.count().label("n")
    rows = conn.execute(
        select(Prediction.error, n)
        .where(Prediction.run_id == run_id, Prediction.error.is_not(None))
        .group_by(Prediction.error)
        .order_by(n.desc(), Prediction.error)
    )
    return [{"error": e, "n": int(k)} for e, k in rows]
