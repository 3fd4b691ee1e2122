"""The reads behind ``producer queue`` and the queue part of ``producer status``: the runs with
batches still to store, how many and how large, and how fast each has been stored lately.

A batch waits while its status is ``queued`` (recorded and sent, not yet stored): on the
broker, or delivered to a worker that is scoring it. The recent rate is over the batches
stored in the last ``window`` seconds (``batches.finished_at``), as ``--wait``'s progress
line measures it (producer/progress.RATE_WINDOW).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Connection, func, select

from db.models import batches, runs, utcnow


@dataclass(frozen=True)
class WaitingRun:
    """A run with batches waiting: how many, their images, its first waiting batch (which
    says which priority list its next message is in), and what it stored lately."""

    run_id: int
    priority: str
    status: str
    batches_waiting: int
    images_waiting: int
    first_waiting: int
    #: images and batches stored in the rate window, and the window's length (seconds)
    recent_images: int
    recent_batches: int
    window: float

    @property
    def rate(self) -> float:
        """Images stored a second over the rate window."""
        return self.recent_images / self.window if self.window > 0 else 0.0


def waiting_runs(
    conn: Connection, window: float, run_ids: Sequence[int] | None = None,
    now: datetime | None = None,
) -> list[WaitingRun]:
    """The unfinished runs (of ``run_ids``, or all) with at least one batch waiting, by id;
    each run's rate window is the last ``window`` seconds, or its life if shorter."""
    now = now or utcnow()
    since = now - timedelta(seconds=window)
    queued = batches.c.status == "queued"
    recent = batches.c.finished_at >= since
    query = (
        select(
            runs.c.id, runs.c.priority, runs.c.status, runs.c.created_at,
            func.count().filter(queued),
            func.coalesce(func.sum(batches.c.n_images).filter(queued), 0),
            func.min(batches.c.seq).filter(queued),
            func.coalesce(func.sum(batches.c.n_scored + batches.c.n_failed).filter(recent), 0),
            func.count().filter(recent),
        )
        .join(batches, batches.c.run_id == runs.c.id)
        .where(runs.c.status.in_(("queued", "running")))
        .group_by(runs.c.id, runs.c.priority, runs.c.status, runs.c.created_at)
        .having(func.count().filter(queued) > 0)
        .order_by(runs.c.id)
    )
    if run_ids is not None:
        query = query.where(runs.c.id.in_(list(run_ids)))
    out = []
    for run_id, priority, status, created, n, images, first, done, n_done in conn.execute(query):
        life = (now - _aware(created, now)).total_seconds()
        out.append(WaitingRun(
            int(run_id), str(priority), str(status), int(n), int(images), int(first),
            int(done), int(n_done), max(0.0, min(window, life)),
        ))
    return out


def _aware(value: datetime, now: datetime) -> datetime:
    if value.tzinfo is None:  # SQLite gives back the stored UTC time without its zone
        return value.replace(tzinfo=now.tzinfo)
    return value


def stored_lately(conn: Connection, window: float, now: datetime | None = None) -> int:
    """Batches of any run stored in the last ``window`` seconds: how fast the workers of
    this database take batches, whoever's."""
    since = (now or utcnow()) - timedelta(seconds=window)
    return int(conn.execute(
        select(func.count()).select_from(batches).where(batches.c.finished_at >= since)
    ).scalar_one())
