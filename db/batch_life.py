"""A batch's life in the database, in one vocabulary:

- **recorded** by its producer before it is sent (:func:`record_batch`): its paths, in order;
- **re-sent** by a healer that found it lost, its re-send taken first (db/healing.py);
- **claimed** by a worker that got its message (:func:`claim_batch`): skip it, give it up as
  poison, split it (the time limit stopped it: worker/splitting.py), or score it, decided
  from the database alone and before any model is loaded;
- **stored** once scored (:func:`store_batch`): the batch claimed ``done`` first (its row
  alone locked: a second delivery storing it at the same moment waits, then writes nothing),
  its rows and its counts (on rows of its own), in one transaction; then its run settled if
  this may be its last batch; a batch stored already and requeued by ``producer resume
  --retry-failed`` has its earlier rows and counts replaced in that transaction
  (:func:`forget_rows`);
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

from sqlalchemy import Connection, Engine, delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from core import defaults
from core.classifier import classes_from_json
from core.columns import BatchColumns, PredictionRow, batch_columns, label_for, unscored_row
from core.errors import MessageError, RunNotFound
from db.bulk import stored_paths, write_predictions
from db.counts import count_rows, write_tallies
from db.mistakes import refill_kept
from db.models import (
    batch_counts,
    batch_failures,
    batches,
    models,
    predictions,
    run_mistakes,
    run_unsure,
    runs,
    utcnow,
)
from db.queries import may_finish, settle_run

#: A batch of this many images is not split: stopped by the time limit, it counts a failed
#: delivery (three fail it as poison, naming the limit).
SPLIT_FLOOR = 1


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
    its status is ``done``, ``failed`` or ``split``."""

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
    #: failed deliveries the task time limit stopped: the next one splits the batch
    time_limited: int = 0
    #: its run's status: a ``cancelled`` run's batches are never scored
    run_status: str = "queued"


@dataclass(frozen=True)
class Claim:
    """What a worker does with a delivered batch: ``skip`` it (``why`` says why, for the log;
    ``""`` for a batch already finished), drop it because its run was ``cancelled``, give it
    up as ``poison`` (``classes`` are its model's class names, for its rows' labels), ``split``
    it in halves (the time limit stopped an earlier delivery), or ``score`` it."""

    action: Literal["skip", "cancelled", "poison", "split", "score"]
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
    if batch.status == "cancelled" or batch.run_status == "cancelled":
        return Claim("cancelled", batch)
    if batch.status != "queued":  # stored by an earlier delivery, or given up on
        return Claim("skip", batch)
    if batch.n_images > max_images:
        return Claim("skip", batch, f"run {run_id} batch {seq} holds {batch.n_images} images, "
                     f"more than {defaults.MAX_BATCH_IMAGES_ENV}={max_images}")
    if batch.failed_deliveries >= max_deliveries:
        return Claim("poison", batch, classes=poison_classes(engine, batch.model_id))
    if batch.time_limited and len(batch.paths) > SPLIT_FLOOR:
        return Claim("split", batch)
    return Claim("score", batch)


def recorded_batch(
    engine: Engine, run_id: int, seq: int, token: str, max_images: int | None = None
) -> RecordedBatch:
    """Batch ``seq`` of run ``run_id`` if this database holds that run with ``token``; else
    :class:`RunMismatch`, naming what differs. Its paths are read only when it is unfinished
    and holds at most ``max_images``."""
    with engine.connect() as conn:
        run = conn.execute(
            select(runs.c.token, runs.c.model_id, runs.c.send_mode, runs.c.source_dir,
                   runs.c.status).where(runs.c.id == run_id)
        ).one_or_none()
        if run is None:
            raise RunMismatch(f"run {run_id} is not in this database")
        if run.token != token:
            raise RunMismatch(f"run {run_id} of this database has another token")
        where = (batches.c.run_id == run_id, batches.c.seq == seq)
        row = conn.execute(
            select(batches.c.status, batches.c.n_images, batches.c.deliveries,
                   batches.c.last_failure, batches.c.time_limited).where(*where)
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
        int(row.time_limited or 0), str(run.status),
    )


def was_cancelled(engine: Engine, run_id: int, seq: int) -> bool:
    """Whether batch ``seq`` or its run was cancelled (db/cancellation.py): what a worker
    whose claim came to nothing, or whose payload went, asks."""
    with engine.connect() as conn:
        found = conn.execute(
            select(runs.c.status, batches.c.status.label("batch_status"))
            .join(batches, batches.c.run_id == runs.c.id)
            .where(runs.c.id == run_id, batches.c.seq == seq)
        ).one_or_none()
    return found is not None and "cancelled" in (found.status, found.batch_status)


def poison_classes(engine: Engine, model_id: int) -> tuple[str, ...]:
    """The model's class names for a poison batch's rows, read without its weights; none
    when the model is gone (db/reads.model_classes, for reports, raises then)."""
    with engine.connect() as conn:
        text = conn.execute(
            select(models.c.classes).where(models.c.id == model_id)
        ).scalar_one_or_none()
    return () if text is None else tuple(classes_from_json(text))


def count_failed_delivery(
    engine: Engine, run_id: int, seq: int, token: str, why: str, time_limited: bool = False
) -> int | None:
    """One more failed delivery of batch ``seq`` of run ``run_id``, ``why`` it failed kept as
    its last failure (committed at once), if the batch is unfinished and its run has
    ``token``; the new count, or ``None`` when no such batch is waiting. A delivery the task
    time limit stopped (``time_limited``) is counted in ``time_limited`` too."""
    more = {"time_limited": batches.c.time_limited + 1} if time_limited else {}
    with engine.begin() as conn:
        count = conn.execute(
            update(batches)
            .where(
                batches.c.run_id == run_id, batches.c.seq == seq, batches.c.status == "queued",
                batches.c.run_id.in_(
                    select(runs.c.id).where(runs.c.id == run_id, runs.c.token == token)
                ),
            )
            .values(deliveries=batches.c.deliveries + 1, last_failure=why[:1000], **more)
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
    return store_batch(engine, batch.run_id, batch.seq, batch_columns(rows), "failed", 1)


def store_batch(
    engine: Engine,
    run_id: int,
    batch_seq: int,
    columns: BatchColumns,
    batch_status: str = "done",
    deliveries: int = 0,
) -> int:
    """Store a batch's prediction rows (``columns``; the first of a path repeated) and mark
    the batch ``batch_status``, adding ``deliveries`` to its delivery count; return how many
    rows were written: 0 when the batch was stored already.

    The rows are written as they are, with no look-up; should the unique index on
    (run_id, path) refuse one (a path stored by another batch of the run, which the producer
    never sends), the transaction is tried again writing only the paths the run lacks. Then
    the run is settled (:func:`settle_run`) if this batch may be its first or its last, or
    was stored already."""
    if len(set(columns.paths)) < len(columns.paths):
        first: dict[str, int] = {}
        for i, path in enumerate(columns.paths):
            first.setdefault(path, i)
        columns = columns.take(list(first.values()))
    look_up = False
    with engine.connect() as conn:  # one check-out of the pool for both transactions
        while True:
            try:
                with conn.begin():
                    stored = write_batch(
                        conn, run_id, batch_seq, columns, batch_status, deliveries, look_up
                    )
                    sqlite = conn.dialect.name == "sqlite"
                    settle = _settle_as(stored, locked=sqlite)
                    if settle is not None and sqlite:
                        # SQLite's writers take turns: this one holds the write lock, so
                        # it sees every other batch's commit, and settles in its own
                        settle_run(conn, run_id, queued=settle)
                        settle = None
                break
            except IntegrityError:
                if look_up:
                    raise
                look_up = True
        # after the commit, so that the last writer sees them all; on PostgreSQL the
        # transaction only when it may change the run (a read outside one: one round trip)
        if settle is not None and (settle or _may_finish(conn, run_id)):
            with conn.begin():
                settle_run(conn, run_id, queued=settle)
    return stored[0] if stored else 0


def _may_finish(conn: Connection, run_id: int) -> bool:
    """:func:`may_finish`, read outside a transaction."""
    conn.execution_options(isolation_level="AUTOCOMMIT")
    try:
        return may_finish(conn, run_id)
    finally:
        conn.rollback()  # ends SQLAlchemy's transaction object: the driver has none open
        if not conn.invalidated:  # a lost server's connection is thrown away
            conn.execution_options(isolation_level=conn.default_isolation_level)


def _settle_as(
    stored: tuple[int, str, int | None] | None, locked: bool
) -> bool | None:
    """Whether the run is to be settled after a store that returned ``stored``, and if so
    whether it may be queued still; ``None`` when it is not to be. A batch stored already
    settles it: perhaps its writer died between its commit and the settling.

    ``locked``: the store read the run's ``n_images`` holding the write lock (SQLite), so
    it is the run's as the store commits. On PostgreSQL it was read before the COPY, and the
    producer may fix it before the commit, settling too soon to see this batch stored: a
    running run is read again after the commit, whatever ``n_images`` said."""
    _, status, n_images = stored or (0, "queued", 0)
    if status == "queued" or (status != "done" and (n_images is not None or not locked)):
        return status == "queued"
    return None


def write_batch(
    conn: Connection,
    run_id: int,
    seq: int,
    columns: BatchColumns,
    batch_status: str = "done",
    deliveries: int = 0,
    look_up: bool = False,
) -> tuple[int, str, int | None] | None:
    """Mark batch ``seq`` stored and write its rows (those the run lacks, if ``look_up``)
    and counts, in the caller's transaction: ``(rows written, the run's status and
    n_images)``, or ``None`` if the batch is stored already."""
    now = utcnow()
    this = (batches.c.run_id == run_id, batches.c.seq == seq)
    counts = count_rows(columns)
    run = None
    merged = conn.dialect.name == "postgresql" and not look_up  # claim and tallies at once
    if merged:
        run = write_tallies(conn, run_id, seq, counts, columns, claim={
            "status": batch_status, "now": now, "deliveries": deliveries})
    if run is None:  # SQLite, a look-up, or a batch stored already or claimed by another
        claim = (  # the batch's row alone is locked, to the commit
            update(batches)
            .where(*this, batches.c.status == "queued")
            .values(status=batch_status, finished_at=now,
                    deliveries=batches.c.deliveries + deliveries, **counts.batch_values())
        )
        # a batch never stored has no histogram; one that has (requeued by resume
        # --retry-failed) has rows and counts, which the second claim replaces (the merged
        # statement tried the first already)
        if merged or not conn.execute(claim.where(batches.c.prob_sgd_bins.is_(None))).rowcount:
            paths = conn.execute(claim.returning(batches.c.paths)).scalar_one_or_none()
            if paths is None:
                _check_recorded(conn, run_id, seq)
                return None
            forget_rows(conn, run_id, seq, paths)
        if look_up:
            held = stored_paths(conn, run_id, columns.paths)
            columns = columns.take([i for i, p in enumerate(columns.paths) if p not in held])
            counts = count_rows(columns)
            conn.execute(update(batches).where(*this).values(**counts.batch_values()))
        run = write_tallies(conn, run_id, seq, counts, columns)
        assert run is not None
    write_predictions(conn, run_id, seq, columns, now)
    return len(columns.paths), *run


def forget_rows(conn: Connection, run_id: int, seq: int, paths: Sequence[str]) -> None:
    """Delete what an earlier store of batch ``seq`` wrote, its ``paths``' rows, its cells
    and failure reasons, and its paths in the run's kept lists, in the caller's transaction
    (the claim has overwritten the counts on its ``batches`` row). Its paths are the run's
    alone: the look-ups go by the (run_id, path) keys."""
    unkept = 0
    for start in range(0, len(paths), 500):
        chunk = list(paths[start:start + 500])
        conn.execute(delete(predictions).where(
            predictions.c.run_id == run_id, predictions.c.batch_seq == seq,
            predictions.c.path.in_(chunk)))
        for kept in (run_mistakes, run_unsure):
            unkept += conn.execute(
                delete(kept).where(kept.c.run_id == run_id, kept.c.path.in_(chunk))
            ).rowcount
    if unkept:  # scored rows (a failed batch's are errors, never kept)
        refill_kept(conn, run_id)
    for table in (batch_counts, batch_failures):
        conn.execute(delete(table).where(table.c.run_id == run_id, table.c.batch_seq == seq))


def _check_recorded(conn: Connection, run_id: int, seq: int) -> None:
    """Raise unless batch ``seq`` of run ``run_id`` is recorded."""
    if conn.execute(select(runs.c.id).where(runs.c.id == run_id)).one_or_none() is None:
        raise RunNotFound(f"run {run_id} does not exist: see `producer runs`")
    found = select(batches.c.id).where(batches.c.run_id == run_id, batches.c.seq == seq)
    if conn.execute(found).one_or_none() is None:
        raise RunMismatch(f"run {run_id} has no recorded batch {seq}")
