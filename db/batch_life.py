"""A batch's life in the database, in one vocabulary:

- **recorded** by its producer before it is sent (:func:`record_batch`): its paths, in order;
- **claimed** by a worker that got its message (:func:`claim_batch`): skip it, give it up as
  poison, or score it, decided from the database alone and before any model is loaded;
- **stored** once scored (:func:`store_batch`): its rows, the batch ``done`` and the run's
  counts, in one transaction;
- a **failed delivery** counted (:func:`count_failed_delivery`) when a worker process died
  holding it, its model could not be loaded or scoring it failed; after
  :data:`~core.defaults.MAX_DELIVERIES` of them the next claim says ``poison``, and the batch
  is **given up** (:func:`give_up`): one error row per image quoting the last failure, the
  batch ``failed``.

The column ``batches.deliveries`` counts deliveries that ended: while a batch is queued, those
are exactly its failed deliveries (:attr:`RecordedBatch.failed_deliveries`); the delivery that
stores it adds itself (and one per retry after a database error). Nothing a message says
counts: a redelivered flag can be forged, a row in this database cannot.

The worker's side, the steps that call these, is ``worker/tasks.handle_batch``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import Engine, insert, select, update

from core import defaults
from core.errors import MessageError, RunNotFound
from core.rows import PredictionRow, label_for, unscored_row
from core.storage import classes_from_json
from db.bulk import insert_new_rows
from db.counts import count_rows
from db.mistakes import keep_mistakes
from db.models import batches, models, runs, utcnow
from db.queries import RUN_COUNTS, add_to_run


class RunMismatch(MessageError):
    """A message for a run or batch this database does not hold as the message names it."""


def record_batch(
    conn, run_id: int, seq: int, paths: Sequence[str], n_bytes: int,
    members: dict[str, Any] | None = None,
) -> None:
    """Record a batch before it is sent (``members``: where an archive batch's members are,
    core/archives.py)."""
    conn.execute(
        insert(batches).values(
            run_id=run_id, seq=seq, paths=list(paths), members=members, n_images=len(paths),
            n_bytes=n_bytes, status="queued", deliveries=0, enqueued_at=utcnow(),
        )
    )


@dataclass(frozen=True)
class RecordedBatch:
    """A batch as its producer recorded it: what a worker scores, whatever a message says.

    ``paths`` is empty unless the batch is to be scored or given up; a batch is finished once
    its status is ``done`` or ``failed``."""

    run_id: int
    seq: int
    model_id: int
    paths: list[str]
    status: str
    n_images: int
    failed_deliveries: int
    send_mode: str = "bytes"
    source_dir: str = ""
    last_failure: str | None = None
    #: an archive batch's record of where its members are (core/archives.py); None: loose
    members: dict[str, Any] | None = None


@dataclass(frozen=True)
class Claim:
    """What a worker does with a delivered batch: ``skip`` it (``why`` says why, for the log;
    ``""`` for a batch already finished), give it up as ``poison`` (``classes`` are its model's
    class names, for its rows' labels), or ``score`` it."""

    action: Literal["skip", "poison", "score"]
    batch: RecordedBatch | None = None
    why: str = ""
    classes: tuple[str, ...] = ()


def claim_batch(
    engine: Engine, run_id: int, seq: int, token: str,
    max_images: int = defaults.MAX_BATCH_IMAGES,
    max_deliveries: int = defaults.MAX_DELIVERIES,
) -> Claim:
    """The claim on batch ``seq`` of run ``run_id`` that a message with ``token`` makes."""
    try:
        batch = recorded_batch(engine, run_id, seq, token, max_images)
    except RunMismatch as e:
        return Claim("skip", why=str(e))
    if batch.status != "queued":  # stored by an earlier delivery, or given up on
        return Claim("skip", batch)
    if batch.n_images > max_images:
        return Claim("skip", batch, f"run {run_id} batch {seq} holds {batch.n_images} images, "
                     f"more than {defaults.MAX_BATCH_IMAGES_ENV}={max_images}")
    if batch.failed_deliveries >= max_deliveries:
        return Claim("poison", batch, classes=model_classes(engine, batch.model_id))
    return Claim("score", batch)


def recorded_batch(
    engine: Engine, run_id: int, seq: int, token: str, max_images: int | None = None
) -> RecordedBatch:
    """Batch ``seq`` of run ``run_id`` if this database holds that run with ``token``; else
    :class:`RunMismatch`, naming what differs. Its paths are read only when it is unfinished
    and holds at most ``max_images``."""
    with engine.connect() as conn:
        run = conn.execute(
            select(runs.c.token, runs.c.model_id, runs.c.send_mode, runs.c.source_dir)
            .where(runs.c.id == run_id)
        ).one_or_none()
        if run is None:
            raise RunMismatch(f"run {run_id} is not in this database")
        if run.token != token:
            raise RunMismatch(f"run {run_id} of this database has another token")
        where = (batches.c.run_id == run_id, batches.c.seq == seq)
        row = conn.execute(
            select(batches.c.status, batches.c.n_images, batches.c.deliveries,
                   batches.c.last_failure).where(*where)
        ).one_or_none()
        if row is None:
            raise RunMismatch(f"run {run_id} has no recorded batch {seq}")
        n_images, paths, members = int(row.n_images), [], None
        if row.status == "queued" and (max_images is None or n_images <= max_images):
            recorded, members = conn.execute(
                select(batches.c.paths, batches.c.members).where(*where)).one()
            paths = list(recorded)
            n_images = len(paths)
    failed = int(row.deliveries or 0) if row.status == "queued" else 0
    return RecordedBatch(
        run_id, seq, int(run.model_id), paths, str(row.status), n_images, failed,
        str(run.send_mode), str(run.source_dir), row.last_failure, members,
    )


def model_classes(engine: Engine, model_id: int) -> tuple[str, ...]:
    """The model's class names, read without its weights; none when the model is gone."""
    with engine.connect() as conn:
        text = conn.execute(
            select(models.c.classes).where(models.c.id == model_id)
        ).scalar_one_or_none()
    return () if text is None else tuple(classes_from_json(text))


def count_failed_delivery(
    engine: Engine, run_id: int, seq: int, token: str, why: str
) -> int | None:
    """One more failed delivery of batch ``seq`` of run ``run_id``, ``why`` it failed kept as
    its last failure (committed at once), if the batch is unfinished and its run has
    ``token``; the new count, or ``None`` when no such batch is waiting."""
    with engine.begin() as conn:
        count = conn.execute(
            update(batches)
            .where(
                batches.c.run_id == run_id, batches.c.seq == seq, batches.c.status == "queued",
                batches.c.run_id.in_(
                    select(runs.c.id).where(runs.c.id == run_id, runs.c.token == token)
                ),
            )
            .values(deliveries=batches.c.deliveries + 1, last_failure=why[:1000])
            .returning(batches.c.deliveries)
        ).scalar_one_or_none()
    return None if count is None else int(count)


def poison_rows(
    paths: Sequence[str], classes: Sequence[str], deliveries: int, last_failure: str | None = None
) -> list[PredictionRow]:
    """One error row per path of a batch given up on, saying why."""
    reason = (
        f"batch abandoned after {deliveries} failed deliveries (poison batch): "
        f"{last_failure or 'the worker process died or failed to score it each time'}"
    )
    return [unscored_row(p, label_for(p, classes), reason) for p in paths]


def give_up(engine: Engine, claim: Claim) -> int:
    """Store a poison batch: an error row per image quoting its last failure, the batch
    ``failed``; the number of rows that were new."""
    batch = claim.batch
    assert batch is not None and claim.action == "poison"
    rows = poison_rows(batch.paths, claim.classes, batch.failed_deliveries, batch.last_failure)
    return store_batch(engine, batch.run_id, batch.seq, rows, "failed", 1)


def store_batch(
    engine: Engine,
    run_id: int,
    batch_seq: int,
    rows: Sequence[PredictionRow],
    batch_status: str = "done",
    deliveries: int = 0,
) -> int:
    """Insert a batch's prediction rows (each a dict of ``predictions`` columns); returns how many
    were new. One transaction: insert the rows whose path is new (in bulk, see db/bulk.py),
    mark the batch (adding ``deliveries`` to its delivery count), then lock the run, count
    the new rows into it (see ``db.queries.add_to_run``) and keep those among its most
    confident mistakes (db/mistakes.py).

    The run is locked last, for the count alone: the writers of one run insert their rows
    side by side and queue only for the few statements that end each transaction, so every
    count still sees every earlier commit. (On PostgreSQL the lock is ``FOR NO KEY UPDATE``,
    which the foreign-key checks of another writer's rows do not wait for; on SQLite the
    transaction holds the database's write lock from its start anyway.) The order is the
    same in every writer, rows then run, so no two writers can wait for each other.
    """
    now = utcnow()
    with engine.begin() as conn:
        if conn.execute(select(runs.c.id).where(runs.c.id == run_id)).one_or_none() is None:
            raise RunNotFound(f"run {run_id} does not exist: see `producer runs`")
        new = insert_new_rows(conn, run_id, batch_seq, rows, now) if rows else []
        conn.execute(
            update(batches)
            .where(batches.c.run_id == run_id, batches.c.seq == batch_seq)
            .values(
                status=batch_status,
                finished_at=now,
                deliveries=batches.c.deliveries + deliveries,
            )
        )
        run = conn.execute(
            select(*RUN_COUNTS).where(runs.c.id == run_id).with_for_update(key_share=True)
        ).one()
        add_to_run(conn, run_id, run, count_rows(new))
        keep_mistakes(conn, run_id, new)
    return len(new)
