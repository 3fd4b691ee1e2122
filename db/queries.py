"""Reads and writes of runs, and the reads of their batches and predictions; a batch's own
life (recorded, claimed, stored, failed) is db/batch_life.py.

A run's counts (scored, failed, labelled, right per predictor; its confusion counts in
``run_counts`` and failure reasons in ``run_failures``) are added to as each batch's new rows
are stored (:func:`add_to_run`), from which its accuracies and status follow. A redelivered
batch therefore never skews a count, and a commit costs the same however many rows the run
already has.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, Select, func, insert, select, update

from core.errors import RunNotFound
from core.rows import PREDICTORS
from db.counts import RowCounts, add_counts
from db.models import batches, predictions, runs, utcnow


def create_run(
    conn: Connection, model_id: int, source_dir: str, backend: str, send_mode: str = "bytes"
) -> tuple[int, str]:
    """A new run's id and token."""
    token = uuid.uuid4().hex
    run_id = conn.execute(
        insert(runs)
        .values(
            token=token,
            model_id=model_id,
            source_dir=source_dir,
            backend=backend,
            send_mode=send_mode,
            status="queued",
            n_skipped=0,
            n_scored=0,
            n_failed=0,
            created_at=utcnow(),
        )
        .returning(runs.c.id)
    ).scalar_one()
    return int(run_id), token


#: The run's columns :func:`add_to_run` needs, read under the run's lock.
RUN_COUNTS = (
    runs.c.status, runs.c.n_images, runs.c.started_at, runs.c.n_scored, runs.c.n_failed,
    runs.c.n_labelled, runs.c.n_correct_l1, runs.c.n_correct_l2, runs.c.n_correct_sgd,
)


def add_to_run(conn: Connection, run_id: int, run: Any, new: RowCounts) -> str:
    """Add a batch's new rows to its run, whose :data:`RUN_COUNTS` ``run`` was read under
    the lock, and to its confusion counts and failure reasons (:func:`add_counts`); set the
    accuracies (right / labelled) and the status from the sums; return the status. The same
    cost whatever the run's size, where re-aggregating the run's rows on every batch would
    make a run of n images cost O(n^2 / batch size)."""
    labelled = int(run.n_labelled) + new.labelled
    values: dict[str, Any] = {
        "n_scored": int(run.n_scored) + new.scored,
        "n_failed": int(run.n_failed) + new.failed,
        "n_labelled": labelled,
    }
    olds = (run.n_correct_l1, run.n_correct_l2, run.n_correct_sgd)
    for p, old, add in zip(PREDICTORS, olds, new.correct, strict=True):
        right = int(old) + add
        values[f"n_correct_{p}"] = right
        values[f"accuracy_{p}"] = right / labelled if labelled else None
    n_rows = values["n_scored"] + values["n_failed"]
    if n_rows and run.started_at is None:
        values["started_at"] = utcnow()
    values.update(settle_status(run.status, n_rows, run.n_images))
    conn.execute(update(runs).where(runs.c.id == run_id).values(**values))
    add_counts(conn, run_id, new)
    return str(values["status"])


def settle_status(
    status: str, n_rows: int, n_images: int | None, now: datetime | None = None
) -> dict[str, Any]:
    """A run's status (and ``finished_at``, ``now``, when it becomes ``done``) for its row
    count."""
    if n_images is not None and n_rows >= n_images:
        return {"status": "done"} if status == "done" else {
            "status": "done", "finished_at": now or utcnow()}
    return {"status": "running" if n_rows and status == "queued" else status}


def finish_submission(engine: Engine, run_id: int, n_images: int, n_skipped: int) -> str:
    """The producer has sent every batch: fix the run's size and settle its status."""
    with engine.begin() as conn:
        run = conn.execute(
            select(runs.c.status, runs.c.n_scored, runs.c.n_failed).where(runs.c.id == run_id)
            .with_for_update(key_share=True)
        ).one()
        now = utcnow()  # sent, and done if the last rows are in: finished_at >= submitted_at
        values = settle_status(run.status, int(run.n_scored) + int(run.n_failed), n_images, now)
        conn.execute(
            update(runs)
            .where(runs.c.id == run_id)
            .values(n_images=n_images, n_skipped=n_skipped, submitted_at=now, **values)
        )
        return str(values["status"])


@dataclass(frozen=True)
class Stall:
    """A run with batches still queued and no batch stored for ``seconds``."""

    queued_batches: int
    seconds: float


def stall(conn: Connection, run: dict[str, Any], now: datetime | None = None) -> Stall | None:
    """How long run ``run`` has stored nothing while batches of it wait, or ``None`` when it
    is not waiting on a batch (done, or none queued)."""
    if run["status"] not in ("queued", "running"):
        return None
    queued, last = conn.execute(
        select(
            func.count().filter(batches.c.status == "queued"),
            func.max(batches.c.finished_at),
        ).where(batches.c.run_id == run["id"])
    ).one()
    if not queued:
        return None
    since = last or run["submitted_at"] or run["created_at"]
    if since.tzinfo is None:  # SQLite gives back the stored UTC time without its zone
        since = since.replace(tzinfo=utcnow().tzinfo)
    return Stall(int(queued), ((now or utcnow()) - since).total_seconds())
def set_send_mode(conn: Connection, run_id: int, send_mode: str) -> None:
    conn.execute(update(runs).where(runs.c.id == run_id).values(send_mode=send_mode))


def get_run(conn: Connection, run_id: int) -> dict[str, Any]:
    row = conn.execute(select(runs).where(runs.c.id == run_id)).mappings().one_or_none()
    if row is None:
        raise RunNotFound(f"run {run_id} does not exist: see `producer runs`")
    return dict(row)


def latest_run_id(conn: Connection) -> int | None:
    return conn.execute(select(func.max(runs.c.id))).scalar_one_or_none()


def list_runs(conn: Connection, limit: int = 50) -> list[dict[str, Any]]:
    rows = conn.execute(select(runs).order_by(runs.c.id.desc()).limit(limit)).mappings()
    return [dict(r) for r in rows]


def unfinished_batches(
    conn: Connection, run_id: int
) -> list[tuple[int, list[str], dict[str, Any] | None]]:
    """(seq, paths, members record) of each queued batch of the run, in order."""
    rows = conn.execute(
        select(batches.c.seq, batches.c.paths, batches.c.members)
        .where(batches.c.run_id == run_id, batches.c.status == "queued")
        .order_by(batches.c.seq)
    )
    return [(int(seq), list(paths), members) for seq, paths, members in rows]


def batch_paths(conn: Connection, run_id: int) -> Iterable[str]:
    for (paths,) in conn.execute(select(batches.c.paths).where(batches.c.run_id == run_id)):
        yield from paths


def images_sent(conn: Connection, run_id: int) -> int:
    total = conn.execute(
        select(func.sum(batches.c.n_images)).where(batches.c.run_id == run_id)
    ).scalar()
    return int(total or 0)


def next_batch_seq(conn: Connection, run_id: int) -> int:
    top = conn.execute(select(func.max(batches.c.seq)).where(batches.c.run_id == run_id)).scalar()
    return 0 if top is None else int(top) + 1


def failures(conn: Connection, run_id: int, limit: int = 20) -> list[tuple[str, str | None]]:
    """The run's first ``limit`` failed rows by path, read from the partial index
    ``ix_predictions_failures`` (which holds only failed rows)."""
    return [(p, e) for p, e in conn.execute(failures_query(run_id, limit))]


def failures_query(run_id: int, limit: int) -> Select[*tuple[Any, ...]]:
    return (
        select(predictions.c.path, predictions.c.error)
        .where(predictions.c.run_id == run_id, predictions.c.error.is_not(None))
        .order_by(predictions.c.path)
        .limit(limit)
    )


@dataclass(frozen=True)
class Progress:
    status: str
    n_images: int | None
    done: int


def progress(conn: Connection, run_id: int) -> Progress:
    row = conn.execute(
        select(runs.c.status, runs.c.n_images, runs.c.n_scored, runs.c.n_failed)
        .where(runs.c.id == run_id)
    ).one_or_none()
    if row is None:
        raise RunNotFound(f"run {run_id} does not exist: see `producer runs`")
    return Progress(row.status, row.n_images, int(row.n_scored) + int(row.n_failed))
