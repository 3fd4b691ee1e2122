"""Reads and writes of runs, batches and predictions.

Writes of results are idempotent: a batch's rows go in with insert-or-ignore on
(run_id, path) in one transaction that also marks the batch done and adds the rows that were
new to the run's counts; when the run is complete its counts, status and accuracies are
re-derived from ``predictions`` with SQL aggregates. A redelivered batch therefore never
duplicates a row or skews a count.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, and_, case, func, insert, select, update

from db.bulk import insert_new_rows
from db.models import Batch, Prediction, Run, utcnow

PREDICTORS = ("l1", "l2", "sgd")


class RunNotFound(LookupError):
    pass


def create_run(conn: Connection, model_id: int, source_dir: str, backend: str) -> int:
    return conn.execute(
        insert(Run)
        .values(
            model_id=model_id,
            source_dir=source_dir,
            backend=backend,
            status="queued",
            n_skipped=0,
            n_scored=0,
            n_failed=0,
            created_at=utcnow(),
        )
        .returning(Run.id)
    ).scalar_one()


def record_batch(conn: Connection, run_id: int, seq: int, paths: Sequence[str], n_bytes: int):
    conn.execute(
        insert(Batch).values(
            run_id=run_id,
            seq=seq,
            paths=list(paths),
            n_images=len(paths),
            n_bytes=n_bytes,
            status="queued",
            deliveries=0,
            enqueued_at=utcnow(),
        )
    )


def store_batch_results(
    engine: Engine,
    run_id: int,
    batch_seq: int,
    rows: Sequence[dict[str, Any]],
    batch_status: str = "done",
    deliveries: int = 0,
) -> int:
    """Insert a batch's prediction rows (each a dict of Prediction columns); returns how many
    were new. One transaction: lock the run, insert the rows whose path is new (in bulk, see
    db/bulk.py), mark the batch (adding ``deliveries`` to its delivery count), count the new
    rows into the run (see :func:`add_to_run`).
    """
    now = utcnow()
    with engine.begin() as conn:
        # Serialise result writes of one run so that every count sees every earlier commit.
        run = conn.execute(
            select(Run.status, Run.n_images, Run.n_scored, Run.n_failed, Run.started_at)
            .where(Run.id == run_id)
            .with_for_update()
        ).one_or_none()
        if run is None:
            raise RunNotFound(f"run {run_id} does not exist")
        new = insert_new_rows(conn, run_id, batch_seq, rows, now) if rows else []
        conn.execute(
            update(Batch)
            .where(Batch.run_id == run_id, Batch.seq == batch_seq)
            .values(
                status=batch_status,
                finished_at=now,
                deliveries=Batch.deliveries + deliveries,
            )
        )
        n_failed = sum(r["error"] is not None for r in new)
        add_to_run(conn, run_id, run, len(new) - n_failed, n_failed)
    return len(new)


def add_to_run(conn: Connection, run_id: int, run: Any, new_scored: int, new_failed: int) -> str:
    """Count a batch's new rows into its run, whose row ``run`` was read under the lock.

    Adding to the counts costs the same whatever the run's size; re-aggregating every row on
    every batch made a run of n images cost O(n^2 / batch size). The full SQL aggregate
    (:func:`refresh_run`) runs when the run is complete, which also sets the accuracies from
    every row, and each time the number of rows passes a power of two, so a running run's
    accuracies are those of at least half its rows, for O(n) work in all.
    """
    before = int(run.n_scored) + int(run.n_failed)
    n_rows = before + new_scored + new_failed
    complete = run.n_images is not None and n_rows >= run.n_images
    if complete or n_rows.bit_length() > before.bit_length():
        return refresh_run(conn, run_id)
    values: dict[str, Any] = {
        "n_scored": int(run.n_scored) + new_scored,
        "n_failed": int(run.n_failed) + new_failed,
    }
    if n_rows and run.started_at is None:
        values["started_at"] = utcnow()
    status = "running" if n_rows and run.status == "queued" else run.status
    values["status"] = status
    conn.execute(update(Run).where(Run.id == run_id).values(**values))
    return status


def batch_finished(engine: Engine, run_id: int, batch_seq: int) -> bool:
    """Whether a batch's rows are stored (``done``) or it was given up on (``failed``)."""
    with engine.connect() as conn:
        status = conn.execute(
            select(Batch.status).where(Batch.run_id == run_id, Batch.seq == batch_seq)
        ).scalar_one_or_none()
    return status in ("done", "failed")


def count_redelivery(engine: Engine, run_id: int, batch_seq: int, retries: int = 0) -> int:
    """Count a redelivery of a batch (committed at once, before any work on it) and return the
    batch's delivery count. A first delivery is counted with its results
    (``store_batch_results(deliveries=...)``), so one that died left no count: when the count
    is still below ``1 + retries`` (the deliveries that must have come before this one: the
    first, and one per retry after a database error), it is raised to that first."""
    earlier = 1 + retries
    with engine.begin() as conn:
        conn.execute(
            update(Batch)
            .where(Batch.run_id == run_id, Batch.seq == batch_seq)
            .values(
                deliveries=case((Batch.deliveries < earlier, earlier), else_=Batch.deliveries) + 1
            )
        )
        return int(
            conn.execute(
                select(Batch.deliveries).where(Batch.run_id == run_id, Batch.seq == batch_seq)
            ).scalar_one_or_none()
            or 0
        )


def _correct(column) -> Any:
    scored_labelled = and_(Prediction.error.is_(None), Prediction.label.is_not(None))
    return func.avg(case((scored_labelled, case((column == Prediction.label, 1.0), else_=0.0))))


def aggregate(conn: Connection, run_id: int) -> dict[str, Any]:
    """Counts and accuracies of a run recomputed from its prediction rows."""
    row = conn.execute(
        select(
            func.count().label("n_rows"),
            func.coalesce(func.sum(case((Prediction.error.is_(None), 1), else_=0)), 0).label(
                "n_scored"
            ),
            func.coalesce(func.sum(case((Prediction.error.is_not(None), 1), else_=0)), 0).label(
                "n_failed"
            ),
            _correct(Prediction.pred_l1).label("accuracy_l1"),
            _correct(Prediction.pred_l2).label("accuracy_l2"),
            _correct(Prediction.pred_sgd).label("accuracy_sgd"),
        ).where(Prediction.run_id == run_id)
    ).one()
    out = dict(row._mapping)
    for key in ("accuracy_l1", "accuracy_l2", "accuracy_sgd"):
        out[key] = None if out[key] is None else float(out[key])
    out["n_scored"] = int(out["n_scored"])
    out["n_failed"] = int(out["n_failed"])
    return out


def refresh_run(conn: Connection, run_id: int) -> str:
    """Re-derive a run's counts, accuracies and status from its predictions; return status."""
    run = conn.execute(
        select(Run.status, Run.n_images, Run.started_at).where(Run.id == run_id)
    ).one()
    agg = aggregate(conn, run_id)
    values: dict[str, Any] = {
        "n_scored": agg["n_scored"],
        "n_failed": agg["n_failed"],
        "accuracy_l1": agg["accuracy_l1"],
        "accuracy_l2": agg["accuracy_l2"],
        "accuracy_sgd": agg["accuracy_sgd"],
    }
    status = run.status
    if agg["n_rows"] and run.started_at is None:
        values["started_at"] = utcnow()
    if run.n_images is not None and agg["n_rows"] >= run.n_images:
        if status != "done":
            status = "done"
            values["finished_at"] = utcnow()
    elif agg["n_rows"] and status == "queued":
        status = "running"
    values["status"] = status
    conn.execute(update(Run).where(Run.id == run_id).values(**values))
    return status


def finish_submission(engine: Engine, run_id: int, n_images: int, n_skipped: int) -> str:
    """The producer has sent every batch: fix the run's size and re-derive its status."""
    with engine.begin() as conn:
        conn.execute(select(Run.id).where(Run.id == run_id).with_for_update())
        conn.execute(
            update(Run)
            .where(Run.id == run_id)
            .values(n_images=n_images, n_skipped=n_skipped, submitted_at=utcnow())
        )
        return refresh_run(conn, run_id)


def get_run(conn: Connection, run_id: int) -> dict[str, Any]:
    row = conn.execute(select(Run.__table__).where(Run.id == run_id)).mappings().one_or_none()
    if row is None:
        raise RunNotFound(f"run {run_id} does not exist")
    return dict(row)


def latest_run_id(conn: Connection) -> int | None:
    return conn.execute(select(func.max(Run.id))).scalar_one_or_none()


def list_runs(conn: Connection, limit: int = 50) -> list[dict[str, Any]]:
    rows = conn.execute(select(Run.__table__).order_by(Run.id.desc()).limit(limit)).mappings()
    return [dict(r) for r in rows]


def unfinished_batches(conn: Connection, run_id: int) -> list[tuple[int, list[str]]]:
    rows = conn.execute(
        select(Batch.seq, Batch.paths)
        .where(Batch.run_id == run_id, Batch.status == "queued")
        .order_by(Batch.seq)
    )
    return [(int(seq), list(paths)) for seq, paths in rows]


def batch_paths(conn: Connection, run_id: int) -> Iterable[str]:
    for (paths,) in conn.execute(select(Batch.paths).where(Batch.run_id == run_id)):
        yield from paths


def images_sent(conn: Connection, run_id: int) -> int:
    total = conn.execute(select(func.sum(Batch.n_images)).where(Batch.run_id == run_id)).scalar()
    return int(total or 0)


def next_batch_seq(conn: Connection, run_id: int) -> int:
    top = conn.execute(select(func.max(Batch.seq)).where(Batch.run_id == run_id)).scalar()
    return 0 if top is None else int(top) + 1


def failures(conn: Connection, run_id: int, limit: int = 20) -> list[tuple[str, str | None]]:
    rows = conn.execute(
        select(Prediction.path, Prediction.error)
        .where(Prediction.run_id == run_id, Prediction.error.is_not(None))
        .order_by(Prediction.path)
        .limit(limit)
    )
    return [(p, e) for p, e in rows]


@dataclass(frozen=True)
class Progress:
    status: str
    n_images: int | None
    done: int


def progress(conn: Connection, run_id: int) -> Progress:
    row = conn.execute(
        select(Run.status, Run.n_images, Run.n_scored, Run.n_failed).where(Run.id == run_id)
    ).one_or_none()
    if row is None:
        raise RunNotFound(f"run {run_id} does not exist")
    return Progress(row.status, row.n_images, int(row.n_scored) + int(row.n_failed))
