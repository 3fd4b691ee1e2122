"""What waits on the broker, and for how long: ``producer queue`` and the queue part of
``producer status``.

The queue's depth is read from Redis directly: the length of each of its priority lists
(core/wire.queue_lists), in the order workers take them. Where a run's next message is, is
found by reading the lists in that order from the end workers take from, each entry only
as far as the run it names (core/queued.batch_of: JSON and msgpack, never pickle), and at
most :data:`SCAN_LIMIT` entries: past that a run is "more than" that many batches behind.
How many batches and images a run has waiting, and how fast it was stored lately, come
from the database (db/backlog.py).

The estimated end of a run being stored is its images waiting over its recent rate; of a
run not stored yet, the batches ahead of it and its own over the rate at which this
database's workers stored batches lately, whoever's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from core import wire
from core.queued import batch_of
from core.text import agree, plural
from db.backlog import WaitingRun, stored_lately, waiting_runs
from producer.progress import RATE_WINDOW

#: The most queue entries read to find where runs' next messages are.
SCAN_LIMIT = 10_000
_CHUNK = 500


@dataclass(frozen=True)
class BrokerQueue:
    """The messages waiting in each priority list of a queue (in the order workers take
    them), and the number of entries ahead of each run's next message among the first
    ``scanned`` entries; ``complete``: every entry was read."""

    name: str
    depths: list[int]
    ahead: dict[int, int]
    scanned: int

    @property
    def complete(self) -> bool:
        return self.scanned >= sum(self.depths)


def read_queue(client: Any, queue: str, limit: int = SCAN_LIMIT) -> BrokerQueue:
    """The depth of ``queue``'s lists and where each run's next message is in it."""
    lists = wire.queue_lists(queue)
    pipe = client.pipeline(transaction=False)
    for name in lists:
        pipe.llen(name)
    depths = [int(n) for n in pipe.execute()]
    ahead: dict[int, int] = {}
    scanned = 0
    for name, depth in zip(lists, depths, strict=True):
        read = 0
        while read < depth and scanned < limit:
            # the worker's BRPOP takes from the right: the entry at -1 is next
            count = min(_CHUNK, depth - read, limit - scanned)
            chunk = client.lrange(name, -(read + count), -(read + 1))
            for offset, raw in enumerate(reversed(chunk)):
                found = batch_of(raw)
                if found is not None:
                    ahead.setdefault(found[0], scanned + offset)
            read += len(chunk)
            scanned += len(chunk)
            if not chunk:  # the list got shorter while being read
                break
    return BrokerQueue(queue, depths, ahead, scanned)


@dataclass(frozen=True)
class RunInQueue:
    """A run with batches waiting, as ``producer queue --json`` shows it."""

    run: int
    priority: str
    status: str
    batches_waiting: int
    images_waiting: int
    #: batches before its next message on the broker; None: not on this broker, or further
    #: than the entries read (``ahead_at_least`` then says how far at least)
    batches_ahead: int | None
    ahead_at_least: int | None
    rate: float
    eta_seconds: float | None


def runs_in_queue(
    conn: Any, queue: BrokerQueue | None, run_ids: list[int] | None = None,
    window: float = RATE_WINDOW,
) -> list[RunInQueue]:
    """The runs of this database with batches waiting (of ``run_ids``, or all), in the order
    the broker serves them (``queue``; ``None``: no broker, by id)."""
    waiting = waiting_runs(conn, window, run_ids)
    fleet = stored_lately(conn, window) / window
    shown = [_place(run, queue, fleet) for run in waiting]
    return sorted(shown, key=lambda r: (r.batches_ahead is None, r.batches_ahead or 0, r.run))


def _place(run: WaitingRun, queue: BrokerQueue | None, fleet: float) -> RunInQueue:
    ahead: int | None = None
    at_least: int | None = None
    if queue is not None:
        ahead = queue.ahead.get(run.run_id)
        if ahead is None and queue.complete:
            ahead = 0  # none of it waits on the broker: its batches are being scored
        elif ahead is None:
            at_least = queue.scanned
    rate = run.rate
    eta: float | None = None
    if rate > 0:
        eta = run.images_waiting / rate
    elif fleet > 0 and ahead is not None:
        eta = (ahead + run.batches_waiting) / fleet
    return RunInQueue(run.run_id, run.priority, run.status, run.batches_waiting,
                      run.images_waiting, ahead, at_least, rate, eta)


def queue_document(queue: BrokerQueue | None, runs: list[RunInQueue]) -> dict[str, Any]:
    """``producer queue --json``."""
    broker = None
    if queue is not None:
        broker = {"queue": queue.name, "messages_waiting": sum(queue.depths),
                  "by_priority_step": dict(zip(wire.PRIORITY_STEPS, queue.depths, strict=True))}
    return {"broker": broker, "runs": [asdict(r) for r in runs]}


def ahead_text(r: RunInQueue) -> str:
    if r.batches_ahead is not None:
        return f"{r.batches_ahead:,}"
    return f">{r.ahead_at_least:,}" if r.ahead_at_least is not None else "?"


def eta_text(seconds: float | None) -> str:
    return "?" if seconds is None else f"{seconds:,.0f} s"


def _ahead(r: RunInQueue) -> int:
    """The count the batches ahead of a run are told by (exact, or at least)."""
    return int(r.batches_ahead if r.batches_ahead is not None else r.ahead_at_least or 0)


def status_queue_line(r: RunInQueue) -> str:
    """The queue part of ``producer status RUN``."""
    ahead = ahead_text(r)
    where = ("" if r.batches_ahead is None and r.ahead_at_least is None
             else f", {ahead} {agree(_ahead(r), 'batch', 'batches')} ahead of it on the broker")
    waiting = plural(r.batches_waiting, "batch", "batches")
    return (f"{waiting} of {plural(r.images_waiting, 'image')} waiting{where}; "
            f"{r.rate:,.0f} images/s over the last {RATE_WINDOW:.0f} s; "
            f"estimated end in {eta_text(r.eta_seconds)}")


def broker_queue(settings: Any) -> BrokerQueue:
    """:func:`read_queue` of the settings' queue on their broker; :class:`BrokerUnavailable`
    naming the broker (password masked) when it cannot be read."""
    from core.errors import BrokerUnavailable, BrokerURLError
    from core.text import first_line, mask_url

    masked = mask_url(settings.broker_url)
    app = wire.make_app(settings)
    try:
        with app.connection_for_read() as conn:
            return read_queue(wire.require_redis(conn, settings.broker_url), settings.queue)
    except BrokerURLError:
        raise
    except Exception as e:
        raise BrokerUnavailable(
            f"cannot read the queue {settings.queue} on the broker {masked} "
            f"({type(e).__name__}: {first_line(e)})"
        ) from None
    finally:
        app.close()
