"""Healing: finding a run's lost batches and sending them again, with no one typing
``producer resume``.

A batch is lost when the database has it unfinished, it was last sent a while ago
(:attr:`Settings.heal_after`, doubling with each re-send up to six sweeps), and the
broker shows, on two sweeps in a row, either

- no message for it, waiting or delivered (a worker on another database took it and
  deleted its payload, a worker whose payload was gone dropped it, or Redis lost it), or
- its message delivered but held by no live worker (the Celery main process holding it was
  killed; Redis would hand it out again only after the visibility timeout), as the live
  workers answer Celery's control API (``active``, ``reserved`` and ``scheduled``).

Two sweeps, because a worker takes a message from the queue a moment before it enters the
unacknowledged hash. Each lost batch's re-send is taken in the database before it is sent
(db/healing.take_resend), so healers running at once (a ``--wait``, a ``producer heal`` from
cron) send it once between them. A copy sent while the first is still being scored writes
its rows once: a batch's rows go in with the claim that marks it done, and a delivery
that finds it done writes nothing.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from core import defaults
from core.archive_batches import read_recorded
from core.errors import DigitscoreError
from core.files import read_batch
from core.queued import Batch, BrokerBatches, read_broker_batches
from core.settings import Settings
from core.text import first_line, plural
from core.wire import BatchMessage
from db.healing import batch_to_send, take_resend, waiting_batches
from db.models import utcnow

#: Why a batch was found lost.
NO_MESSAGE = "no message for it on the broker"
HELD_BY_NONE = "its message held by no live worker"


@dataclass
class Healed:
    """What one sweep found and did: the batches re-sent, by run, with why each was lost,
    and the ones that could not be."""

    resent: dict[int, list[tuple[int, str]]] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)

    def count(self, run_id: int | None = None) -> int:
        if run_id is not None:
            return len(self.resent.get(run_id, []))
        return sum(len(v) for v in self.resent.values())

    def reasons(self, run_id: int) -> list[str]:
        return sorted({why for _, why in self.resent.get(run_id, [])})

    def said(self, run_id: int) -> str:
        """``re-sent 2 lost batches (why)``: what the sweep did for one run, as a line."""
        lost = plural(self.count(run_id), "lost batch", "lost batches")
        return f"re-sent {lost} ({'; '.join(self.reasons(run_id))})"


class Healer:
    """Sweeps for lost batches of some runs (or all) and re-sends them; keeps the suspects of
    its last sweep, which the next one confirms."""

    def __init__(self, engine: Engine, settings: Settings, run_ids: Sequence[int] | None = None):
        from producer.queue import CelerySender

        self.engine = engine
        self.settings = settings
        self.run_ids = run_ids
        self.sender = CelerySender(settings)
        self.after = settings.heal_after
        self.suspects: dict[Batch, str] = {}

    def sweep(self) -> Healed:
        """One sweep: suspect, confirm what the last sweep suspected too, take and send."""
        healed = Healed()
        now = utcnow()
        with self.engine.connect() as conn:
            waiting = waiting_batches(conn, now - timedelta(seconds=self.after), self.run_ids)
        due = [b for b in waiting if _waited(now, b.enqueued_at) >= self.backoff(b.resends)]
        if not due:
            self.suspects = {}
            return healed
        view = read_broker_batches(self.sender._payload_store(), self.sender.queue)
        suspects = self._suspect({(b.run_id, b.seq) for b in due}, view)
        confirmed = {k: why for k, why in suspects.items() if k in self.suspects}
        self.suspects = {k: why for k, why in suspects.items() if k not in confirmed}
        for batch in due:
            key = (batch.run_id, batch.seq)
            if key in confirmed and take_resend(self.engine, batch):
                self._resend(batch.run_id, batch.seq, confirmed[key], healed)
        return healed

    def backoff(self, resends: int) -> float:
        """Seconds a batch waits after its last send before it can be found lost."""
        return min(self.after * 2 ** resends, 3 * self.after)

    def _suspect(self, keys: set[Batch], view: BrokerBatches) -> dict[Batch, str]:
        suspects = {k: NO_MESSAGE for k in keys if not view.holds(k)}
        old = time.time() - self.after
        delivered = {k for k in keys if view.delivered.get(k, old + 1) <= old}
        if delivered:
            held = held_by_live_workers(self.settings)
            if held is not None:
                suspects.update({k: HELD_BY_NONE for k in delivered - held})
        return suspects

    def _resend(self, run_id: int, seq: int, why: str, healed: Healed) -> None:
        with self.engine.connect() as conn:
            row = batch_to_send(conn, run_id, seq)
        message = BatchMessage(run_id, seq, row["token"])
        paths, members, root = list(row["paths"]), row["members"], str(Path(row["source_dir"]))
        read = None if row["send_mode"] == "paths" else (
            lambda: read_batch(root, paths) if members is None
            else read_recorded(root, paths, members))
        try:
            self.sender.resend(message, read, row["priority"])
        except (DigitscoreError, OSError) as e:
            healed.failed.append(f"run {run_id} batch {seq}: {first_line(e)}")
            return
        healed.resent.setdefault(run_id, []).append((seq, why))


def sweep_and_say(healer: Healer, run_id: int) -> str | None:
    """One sweep of a ``--wait``: what it re-sent, or why it could not look, as a line."""
    try:
        healed = healer.sweep()
    except Exception as e:  # noqa: BLE001 - the broker or database away: the next sweep tries
        return f"cannot look for lost batches now: {type(e).__name__}: {first_line(e)}"
    parts = []
    if healed.count(run_id):
        parts.append(healed.said(run_id))
    parts.extend(f"cannot re-send {line}" for line in healed.failed)
    return "; ".join(parts) or None


def held_by_live_workers(settings: Settings) -> set[Batch] | None:
    """The batches the live workers hold (running, reserved, or waiting to retry after a
    database error), as they answer Celery's control API; ``None`` when it cannot be asked
    (then no delivered batch is judged)."""
    from core import wire

    app = wire.make_app(settings)
    try:
        active = app.control.inspect(timeout=defaults.INSPECT_TIMEOUT).active() or {}
        # the workers that answered: the next two questions end once they all have
        again = app.control.inspect(timeout=defaults.INSPECT_TIMEOUT, limit=len(active))
        replies = [active, (again.reserved() or {}) if active else {}]
        # a retry waits for its countdown as a scheduled request: {"eta", "request": {...}}
        scheduled = (again.scheduled() or {}) if active else {}
    except Exception:  # noqa: BLE001 - no answer means no judgement, not a lost batch
        return None
    finally:
        app.close()
    tasks = [task for reply in replies for found in reply.values() for task in found]
    tasks += [entry.get("request") or {} for found in scheduled.values() for entry in found]
    held: set[Batch] = set()
    for task in tasks:
        try:
            message = BatchMessage.from_args(task.get("args"))
        except Exception:  # noqa: BLE001, S112 - not one of ours
            continue
        held.add((message.run_id, message.seq))
    return held


def _waited(now: Any, then: Any) -> float:
    if then.tzinfo is None:  # SQLite gives back the stored UTC time without its zone
        then = then.replace(tzinfo=now.tzinfo)
    return float((now - then).total_seconds())
