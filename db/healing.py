"""The reads and writes of healing: which batches have waited unfinished long enough to be
suspected lost, and the re-send a healer takes on one before sending it again.

Taking it is a compare-and-set on the batch's ``enqueued_at`` (when it was last sent): of two
healers that found the same batch lost, one moves the time on and sends; the other's update
matches no row and it sends nothing. A batch just re-sent is not suspected again until it has
waited anew.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, or_, select, update

from db.models import batches, runs, utcnow


@dataclass(frozen=True)
class WaitingBatch:
    """An unfinished batch as last sent: when, and how often it was re-sent already."""

    run_id: int
    seq: int
    enqueued_at: datetime
    resends: int


def waiting_batches(
    conn: Connection, sent_before: datetime, run_ids: Sequence[int] | None = None
) -> list[WaitingBatch]:
    """The unfinished batches last sent before ``sent_before`` of the unfinished runs (of
    ``run_ids``, or all) that no live sender holds (db/leases.py): while one does, it may be
    between recording a batch and sending it."""
    now = utcnow()
    query = (
        select(batches.c.run_id, batches.c.seq, batches.c.enqueued_at, batches.c.resends)
        .join(runs, runs.c.id == batches.c.run_id)
        .where(
            batches.c.status == "queued",
            batches.c.enqueued_at < sent_before,
            runs.c.status.in_(("queued", "running")),
            or_(runs.c.lease_until.is_(None), runs.c.lease_until <= now),
        )
        .order_by(batches.c.run_id, batches.c.seq)
    )
    if run_ids is not None:
        query = query.where(batches.c.run_id.in_(list(run_ids)))
    return [WaitingBatch(int(r.run_id), int(r.seq), r.enqueued_at, int(r.resends))
            for r in conn.execute(query)]


def take_resend(engine: Engine, batch: WaitingBatch) -> bool:
    """Take the re-send of ``batch`` (as :func:`waiting_batches` read it): ``True`` when
    this healer is to send it, ``False`` when it is finished or another healer (or a
    ``resume``) sent it since."""
    with engine.begin() as conn:
        return bool(conn.execute(
            update(batches)
            .where(
                batches.c.run_id == batch.run_id,
                batches.c.seq == batch.seq,
                batches.c.status == "queued",
                batches.c.enqueued_at == batch.enqueued_at,
            )
            .values(enqueued_at=utcnow(), resends=batches.c.resends + 1)
        ).rowcount)


def mark_sent(conn: Connection, run_id: int, seq: int) -> None:
    """Batch ``seq`` was sent again just now (by ``resume``)."""
    conn.execute(
        update(batches)
        .where(batches.c.run_id == run_id, batches.c.seq == seq)
        .values(enqueued_at=utcnow())
    )


def batch_to_send(conn: Connection, run_id: int, seq: int) -> dict[str, Any]:
    """What sending batch ``seq`` again needs: its paths (and, for archive members, where
    they are) and its run's token, mode, source directory and priority."""
    row = conn.execute(
        select(batches.c.paths, batches.c.members, runs.c.token, runs.c.send_mode,
               runs.c.source_dir, runs.c.priority)
        .join(runs, runs.c.id == batches.c.run_id)
        .where(batches.c.run_id == run_id, batches.c.seq == seq)
    ).mappings().one()
    return dict(row)
