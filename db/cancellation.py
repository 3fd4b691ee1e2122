"""Cancelling a run, in the database, so that it outlives every worker's memory.

One transaction: the run's row is marked ``cancelled`` first (it is locked to the commit, so a
batch being split waits, or has split), then every batch of it still ``queued`` is marked
``cancelled``, then the run's counts are summed from what its batches stored. A worker claims
a batch only while it is ``queued`` (db/batch_life.write_batch), so a batch being scored is
either stored before this commit, and counted, or finds its claim gone and stores nothing; no
batch is ever half stored. A worker that gets a message for the run afterwards finds the run
cancelled (db/batch_life.claim_batch) and drops it unscored. Nothing already stored goes.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine, select, update

from core.errors import RunNotFound
from db.models import batches, runs, utcnow
from db.queries import count_stored
from db.session import read_then_write

#: The statuses of a run that no worker scores any more.
FINISHED = ("done", "cancelled")


@dataclass(frozen=True)
class Cancelled:
    """What a cancel did: the run's status before it (``done``: nothing changed), its token,
    and the batches it stopped (their payloads are to go from Redis)."""

    run_id: int
    was: str
    token: str
    stopped: tuple[int, ...]


def cancel_run(engine: Engine, run_id: int) -> Cancelled:
    """Cancel run ``run_id``: see the module's docstring. A done run is left as it is; a
    cancelled one is cancelled again, which stops any batch its sender recorded since."""
    with read_then_write(engine) as conn:
        row = conn.execute(
            select(runs.c.status, runs.c.token).where(runs.c.id == run_id)
        ).one_or_none()
        if row is None:
            raise RunNotFound(f"run {run_id} does not exist: see `producer runs`")
        was, token = str(row.status), str(row.token)
        # the run's row locked to the commit; a run settled ``done`` since the read stays so
        marked = conn.execute(
            update(runs)
            .where(runs.c.id == run_id, runs.c.status.in_(("queued", "running", "cancelled")))
            .values(status="cancelled")
        ).rowcount
        if not marked:
            return Cancelled(run_id, "done", token, ())
        stopped = conn.execute(
            update(batches)
            .where(batches.c.run_id == run_id, batches.c.status == "queued")
            .values(status="cancelled", finished_at=utcnow())
            .returning(batches.c.seq)
        ).scalars().all()
        count_stored(conn, run_id)
    return Cancelled(run_id, was, token, tuple(sorted(int(s) for s in stopped)))


def run_status(engine: Engine, run_id: int) -> str | None:
    """The run's status, or ``None`` when it is gone."""
    with engine.connect() as conn:
        found = conn.execute(select(runs.c.status).where(runs.c.id == run_id)).scalar()
    return None if found is None else str(found)
