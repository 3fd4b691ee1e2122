"""Splitting a batch that the task time limit stopped: its next delivery records its two
halves as new batches of the run and the batch itself as ``split`` (finished, no rows of its
own), in one transaction, so that each half is owed (queued) before any message for it is
sent, and ``producer resume`` re-sends them should the messages be lost. A batch of one
archive's members (core/archive_batches.py) is split with its record: each half keeps the
archive and the places and labels of its own members."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, func, insert, select, update

from db.models import batches, runs, utcnow
from db.session import read_then_write


def split_batch(engine: Engine, run_id: int, seq: int) -> list[tuple[int, list[str]]]:
    """Record the halves of queued batch ``seq`` as new queued batches (the next numbers of
    the run) and mark it ``split``; returns each half's number and paths, or ``[]`` when
    the batch is no longer queued (another delivery split or stored it)."""
    with read_then_write(engine) as conn:
        # the run's lock: two batches split at once take distinct numbers (a producer
        # recording its next batch meanwhile takes the number after: producer/submit.py)
        conn.execute(select(runs.c.id).where(runs.c.id == run_id).with_for_update())
        where = (batches.c.run_id == run_id, batches.c.seq == seq, batches.c.status == "queued")
        found = conn.execute(
            select(batches.c.paths, batches.c.members).where(*where)
        ).one_or_none()
        if found is None or len(found.paths) < 2:
            return []
        paths, members = list(found.paths), found.members
        top = conn.execute(
            select(func.max(batches.c.seq)).where(batches.c.run_id == run_id)
        ).scalar_one()
        middle = len(paths) // 2
        parts = [slice(0, middle), slice(middle, None)]
        halves = [(int(top) + 1 + i, paths[part]) for i, part in enumerate(parts)]
        now = utcnow()
        for (half_seq, half), part in zip(halves, parts, strict=True):
            conn.execute(insert(batches).values(
                run_id=run_id, seq=half_seq, paths=half, n_images=len(half), n_bytes=0,
                members=_members_of(members, part), status="queued", deliveries=0,
                time_limited=0, enqueued_at=now,
            ))
        conn.execute(update(batches).where(*where).values(status="split", finished_at=now))
    return halves


def run_priority(engine: Engine, run_id: int) -> str:
    """The run's priority, at which the halves of its batches are sent."""
    with engine.connect() as conn:
        return str(conn.execute(select(runs.c.priority).where(runs.c.id == run_id)).scalar_one())


def _members_of(record: dict[str, Any] | None, part: slice) -> dict[str, Any] | None:
    """The part of an archive batch's record (None: a batch of loose files) that ``part`` of
    its paths needs: the archive, and its members' places and labels in that slice."""
    if record is None:
        return None
    half = {**record, "members": record["members"][part]}
    if record.get("labels") is not None:
        half["labels"] = record["labels"][part]
    return half
