"""Deleting finished runs: every row of a run in every table keyed by it, in one
transaction; the models it used stay.

A run is deleted only once no worker scores it: ``done``, or ``cancelled``
(db/cancellation.py); its row is locked first, so a ``resume --retry-failed`` making it
``running`` again waits, or has done so and the delete refuses. The ids of deleted runs are
never handed out again (migration 0015)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, delete, func, select

from core.errors import RunNotFound, RunUnfinished
from db.cancellation import FINISHED
from db.models import (
    batch_counts,
    batch_failures,
    batches,
    run_mistakes,
    run_unsure,
    runs,
)
from db.queries import delete_run_rows
from db.session import read_then_write

#: The tables of a run's own rows besides ``predictions``, ``batches`` and ``runs``, in the
#: order their foreign keys allow.
_KEPT_BY_RUN = (batch_counts, batch_failures, run_mistakes, run_unsure)


@dataclass(frozen=True)
class RunFootprint:
    """What a run holds: its rows (as its batches count them), batches and token."""

    run_id: int
    status: str
    token: str
    rows: int
    batches: int
    source_dir: str
    ended: datetime | None

    def describe(self) -> str:
        return (f"run {self.run_id} ({self.status}, {self.source_dir}): {self.rows:,} rows, "
                f"{self.batches:,} batches")


_FOOTPRINT = select(
    runs.c.id, runs.c.status, runs.c.token, runs.c.source_dir,
    func.coalesce(runs.c.finished_at, runs.c.created_at).label("ended"),
    select(func.coalesce(func.sum(batches.c.n_scored + batches.c.n_failed), 0))
    .where(batches.c.run_id == runs.c.id).scalar_subquery().label("rows"),
    select(func.count()).where(batches.c.run_id == runs.c.id).scalar_subquery().label("n"),
)


def _footprint(row: Any) -> RunFootprint:
    return RunFootprint(int(row.id), str(row.status), str(row.token), int(row.rows),
                        int(row.n), str(row.source_dir), row.ended)


def footprint(conn: Connection, run_id: int) -> RunFootprint:
    row = conn.execute(_FOOTPRINT.where(runs.c.id == run_id)).one_or_none()
    if row is None:
        raise RunNotFound(f"run {run_id} does not exist: see `producer runs`")
    return _footprint(row)


def finished_before(conn: Connection, cutoff: datetime) -> list[RunFootprint]:
    """The done or cancelled runs that ended (or, never ended, were created) before
    ``cutoff``, oldest first."""
    ended = func.coalesce(runs.c.finished_at, runs.c.created_at)
    rows = conn.execute(
        _FOOTPRINT.where(runs.c.status.in_(FINISHED), ended < cutoff).order_by(runs.c.id))
    return [_footprint(r) for r in rows]


def check_deletable(run: RunFootprint) -> None:
    """:class:`RunUnfinished` unless no worker scores ``run`` any more."""
    if run.status not in FINISHED:
        raise RunUnfinished(
            f"run {run.run_id} is {run.status}: nothing was deleted; cancel it first "
            f"(`producer cancel {run.run_id}`), or wait for it"
        )


@dataclass(frozen=True)
class Deleted:
    run_id: int
    token: str
    rows: int
    batches: int


def delete_run(engine: Engine, run_id: int) -> Deleted:
    """Delete run ``run_id`` and everything of it: see the module's docstring."""
    with read_then_write(engine) as conn:
        locked = conn.execute(
            select(runs.c.id).where(runs.c.id == run_id).with_for_update()).one_or_none()
        if locked is None:
            raise RunNotFound(f"run {run_id} does not exist: see `producer runs`")
        run = footprint(conn, run_id)
        check_deletable(run)
        for table in _KEPT_BY_RUN:
            conn.execute(delete(table).where(table.c.run_id == run_id))
        rows = delete_run_rows(conn, run_id)
        n_batches = conn.execute(delete(batches).where(batches.c.run_id == run_id)).rowcount
        conn.execute(delete(runs).where(runs.c.id == run_id))
    return Deleted(run_id, run.token, rows, int(n_batches))


def sqlite_file(engine: Engine) -> str | None:
    """The file of a SQLite database on disk, else ``None``."""
    if engine.url.get_backend_name() != "sqlite":
        return None
    name = engine.url.database
    return name if name and name != ":memory:" and os.path.exists(name) else None


def vacuum(engine: Engine) -> tuple[int, int]:
    """``VACUUM`` a SQLite database file (outside any transaction): its sizes before and
    after, in bytes."""
    path = sqlite_file(engine)
    assert path is not None
    before = os.path.getsize(path)
    raw = engine.raw_connection()  # the driver's own, in autocommit (db/session.py)
    try:
        raw.cursor().execute("VACUUM")
    finally:
        raw.close()
    return before, os.path.getsize(path)
