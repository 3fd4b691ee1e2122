"""Reads and writes of runs, and the reads of their batches and predictions; a batch's own
life (recorded, claimed, stored, failed) is db/batch_life.py.

A run's counts are the sums of its batches' (``run_totals``), which each batch's commit
writes on rows of its own (db/counts.py), exact at every commit. The ``runs`` row is settled
from those sums when the run's last batch is stored (:func:`settle_run`).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, Select, bindparam, func, insert, select, text, update
from sqlalchemy.exc import IntegrityError

from core.columns import PREDICTORS
from core.errors import RunNotFound
from db.mistakes import trim_kept
from db.models import batches, predictions, runs, utcnow

log = logging.getLogger(__name__)

def create_run(
    conn: Connection,
    model_id: int,
    source_dir: str,
    backend: str,
    send_mode: str = "bytes",
    lease: tuple[str, float] | None = None,
    priority: str = "normal",
) -> tuple[int, str]:
    """A new run's id and token; ``lease``, ``(holder, seconds)``, gives its sender's lease
    (db/leases.py) to the process creating it; ``priority`` is one of
    ``core.defaults.PRIORITIES``."""
    token = uuid.uuid4().hex
    now = utcnow()
    held = {} if lease is None else {
        "lease_holder": lease[0], "lease_until": now + timedelta(seconds=lease[1])}
    run_id = conn.execute(
        insert(runs)
        .values(
            token=token,
            model_id=model_id,
            source_dir=source_dir,
            backend=backend,
            send_mode=send_mode,
            priority=priority,
            status="queued",
            n_skipped=0,
            n_scored=0,
            n_failed=0,
            created_at=now,
            **held,
        )
        .returning(runs.c.id)
    ).scalar_one()
    if conn.dialect.name == "postgresql":
        # made apart and attached: ATTACH locks ``predictions`` against other DDL only,
        # where CREATE TABLE ... PARTITION OF would lock out its readers and writers
        name = partition_of(run_id)
        conn.exec_driver_sql(f"CREATE TABLE {name} (LIKE predictions INCLUDING DEFAULTS)")
        conn.exec_driver_sql(
            f"ALTER TABLE predictions ATTACH PARTITION {name} FOR VALUES IN ({int(run_id)})")
    return int(run_id), token


def partition_of(run_id: int) -> str:
    """The PostgreSQL table of run ``run_id``'s ``predictions`` rows (migration 0018)."""
    return f"predictions_run_{int(run_id)}"


def index_run_rows(conn: Connection, run_id: int) -> None:
    """On PostgreSQL, build the unique (run_id, path) index of a finished run's partition,
    if it has none yet: one sort of its rows, where an index kept while the run's writers
    COPY would cost each row several times that (docs/performance.md). Rows with a path
    twice, which the producer never sends, leave the run without it, logged."""
    if conn.dialect.name != "postgresql":
        return
    name = partition_of(run_id)
    try:
        with conn.begin_nested():
            conn.exec_driver_sql(
                f"CREATE UNIQUE INDEX IF NOT EXISTS {name}_path ON {name} (run_id, path)")
    except IntegrityError as e:
        log.error("run %d holds a path twice, so its rows have no unique index: %s",
                  run_id, e.orig)


def requeue_failed_batches(engine: Engine, run_id: int) -> int:
    """Make the run's failed batches queued again, their delivery counts reset (the time
    limit's too: requeued whole, a batch is scored whole, not split), so that a
    re-send scores them (``producer resume --retry-failed``), and the run unfinished until
    they are stored (then :func:`settle_run` settles it again); their rows and counts stay
    until then, and the delivery that stores one replaces them
    (``db.batch_life.forget_rows``). Returns how many were requeued."""
    with engine.begin() as conn:
        requeued = conn.execute(
            update(batches)
            .where(batches.c.run_id == run_id, batches.c.status == "failed",
                   batches.c.run_id.in_(select(runs.c.id).where(
                       runs.c.id == run_id, runs.c.status != "cancelled")))
            .values(status="queued", deliveries=0, time_limited=0, last_failure=None,
                    finished_at=None)
        ).rowcount
        if requeued:
            conn.execute(update(runs).where(runs.c.id == run_id, runs.c.status == "done")
                         .values(status="running", finished_at=None))
    return int(requeued)


#: The counts of ``runs`` that are sums of its batches', and the accuracies that follow.
SUMMED = ("n_scored", "n_failed", "n_labelled", "n_correct_l1", "n_correct_l2", "n_correct_sgd")
_SUMS = ", ".join(f"COALESCE(SUM({c}), 0) AS {c}" for c in SUMMED) + ", " + ", ".join(
    f"CAST(SUM(n_correct_{p}) AS DOUBLE PRECISION) / NULLIF(SUM(n_labelled), 0) AS accuracy_{p}"
    for p in PREDICTORS
)
_RUN_TOTALS = text(f"SELECT {_SUMS} FROM batches WHERE run_id = :r")
#: ``now`` bound as the ``runs`` timestamps are stored (on SQLite, text without the zone)
_NOW = bindparam("now", type_=runs.c.started_at.type)
_START = text(
    "UPDATE runs SET status = 'running', started_at = :now WHERE id = :r AND status = 'queued' "
    "AND EXISTS (SELECT 1 FROM batches WHERE run_id = :r AND status <> 'queued')"
).bindparams(_NOW)
_QUEUED = "SELECT 1 FROM batches WHERE run_id = :r AND status = 'queued'"
#: A run that settling makes ``done``: sent in full, none of its batches queued.
_FINISHED = (
    "id = :r AND status IN ('queued', 'running') AND n_images IS NOT NULL "
    f"AND NOT EXISTS ({_QUEUED})"
)
_FINISH = text(
    f"UPDATE runs SET ({', '.join(SUMMED)}, {', '.join(f'accuracy_{p}' for p in PREDICTORS)}) "
    f"= (SELECT {_SUMS} FROM batches WHERE run_id = :r), status = 'done', finished_at = :now, "
    f"started_at = COALESCE(started_at, :now) WHERE {_FINISHED}"
).bindparams(_NOW)
#: A cancelled run's counts and accuracies: what its batches stored (db/cancellation.py)
_COUNT_STORED = text(
    f"UPDATE runs SET ({', '.join(SUMMED)}, {', '.join(f'accuracy_{p}' for p in PREDICTORS)}) "
    f"= (SELECT {_SUMS} FROM batches WHERE run_id = :r), finished_at = :now WHERE id = :r"
).bindparams(_NOW)
_MAY_FINISH = text(f"SELECT 1 FROM runs WHERE {_FINISHED}")


def run_totals(conn: Connection, run_id: int) -> dict[str, Any]:
    """The run's counts and accuracies as its stored batches sum them: what ``runs`` holds
    once the run is settled, exact at every commit before."""
    row = conn.execute(_RUN_TOTALS, {"r": run_id}).mappings().one()
    out: dict[str, Any] = {k: int(row[k]) for k in SUMMED}
    for p in PREDICTORS:
        value = row[f"accuracy_{p}"]
        out[f"accuracy_{p}"] = None if value is None else float(value)
    return out


def settle_run(conn: Connection, run_id: int, queued: bool = True) -> bool:
    """Settle the ``runs`` row from its batches; return whether it became ``done``. A
    ``queued`` run (if ``queued`` may be so) becomes ``running`` once a batch is stored; a
    run whose producer has sent everything (``n_images`` set) and none of whose batches is
    queued becomes ``done``, with its counts and accuracies summed and its kept lists cut
    (db/mistakes.py).

    Each is one ``UPDATE`` whose ``WHERE`` is false, and so locks nothing, until it is
    true. The writers call it after their commit, so the last of them to commit sees every
    batch stored; the producer calls it when it has sent the last batch."""
    at = {"r": run_id, "now": utcnow()}
    if queued:
        conn.execute(_START, at)
    done = conn.execute(_FINISH, at).rowcount > 0
    if done:
        trim_kept(conn, run_id)
        index_run_rows(conn, run_id)
    return done


def count_stored(conn: Connection, run_id: int) -> None:
    """Write into the ``runs`` row the counts of what the run's batches stored, and now as
    its end: a cancelled run's settling, with nothing more to come."""
    conn.execute(_COUNT_STORED, {"r": run_id, "now": utcnow()})
    trim_kept(conn, run_id)
    index_run_rows(conn, run_id)


def may_finish(conn: Connection, run_id: int) -> bool:
    """Whether :func:`settle_run` would make the run ``done`` now: the same test, read
    without a lock."""
    return conn.execute(_MAY_FINISH, {"r": run_id}).first() is not None


def finish_submission(engine: Engine, run_id: int, n_images: int, n_skipped: int) -> str:
    """The producer has sent every batch: fix the run's size and settle it."""
    with engine.begin() as conn:
        now = utcnow()  # sent, and done if the last rows are in: finished_at >= submitted_at
        # a resume of a run whose walk was complete re-sends batches: it was sent already.
        # One UPDATE, no read first: on SQLite a deferred transaction that reads and then
        # writes fails at once ("database is locked") if a worker committed in between.
        conn.execute(
            update(runs)
            .where(runs.c.id == run_id)
            .values(n_images=n_images, n_skipped=n_skipped,
                    submitted_at=func.coalesce(runs.c.submitted_at, now))
        )
    # settled in a transaction of its own, begun after that commit: a writer whose batch
    # committed before it saw no n_images (its lock-free may_finish says no), and this
    # transaction's snapshot holds that batch; one that commits after it sees n_images
    with engine.begin() as conn:
        settle_run(conn, run_id)
        return str(conn.execute(select(runs.c.status).where(runs.c.id == run_id)).scalar_one())


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
    """The run's row, with its counts summed from its batches until it is settled."""
    row = conn.execute(select(runs).where(runs.c.id == run_id)).mappings().one_or_none()
    if row is None:
        raise RunNotFound(f"run {run_id} does not exist: see `producer runs`")
    return _live(conn, dict(row))


def _live(conn: Connection, run: dict[str, Any]) -> dict[str, Any]:
    if run["status"] not in ("done", "cancelled"):  # settled: nothing more is stored
        run.update(run_totals(conn, run["id"]))
    return run


def latest_run_id(conn: Connection) -> int | None:
    return conn.execute(select(func.max(runs.c.id))).scalar_one_or_none()


def list_runs(conn: Connection, limit: int = 50) -> list[dict[str, Any]]:
    """The newest runs, each with ``repeats_run``: the latest earlier run of the same
    directory with the same model (``None`` if none), the twin a repeated submit leaves."""
    earlier = runs.alias("earlier")
    repeats = (
        select(func.max(earlier.c.id))
        .where(
            earlier.c.source_dir == runs.c.source_dir,
            earlier.c.model_id == runs.c.model_id,
            earlier.c.id < runs.c.id,
        )
        .scalar_subquery()
        .label("repeats_run")
    )
    rows = conn.execute(select(runs, repeats).order_by(runs.c.id.desc()).limit(limit)).mappings()
    return [_live(conn, dict(r)) for r in rows]


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
    """The images of the run's batches (a split batch's are its halves')."""
    total = conn.execute(
        select(func.sum(batches.c.n_images))
        .where(batches.c.run_id == run_id, batches.c.status != "split")
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
    """The run's status, size and rows stored (summed from its batches: one index range)."""
    row = conn.execute(
        select(
            runs.c.status, runs.c.n_images,
            select(func.coalesce(func.sum(batches.c.n_scored + batches.c.n_failed), 0))
            .where(batches.c.run_id == run_id).scalar_subquery(),
        ).where(runs.c.id == run_id)
    ).one_or_none()
    if row is None:
        raise RunNotFound(f"run {run_id} does not exist: see `producer runs`")
    return Progress(row[0], row[1], int(row[2]))


def delete_run_rows(conn: Connection, run_id: int) -> int:
    """Delete run ``run_id``'s rows from ``predictions`` (its counts, batches and kept lists
    are left to the caller): on PostgreSQL by dropping its partition; return how many went."""
    if conn.dialect.name != "postgresql":
        return int(
            conn.execute(predictions.delete().where(predictions.c.run_id == run_id)).rowcount)
    name = partition_of(run_id)
    n = conn.exec_driver_sql(f"SELECT COUNT(*) FROM {name}").scalar_one()
    conn.exec_driver_sql(f"DROP TABLE {name}")
    return int(n)
