"""Who sends a run now: the lease a ``submit`` or ``resume`` holds on its run.

A sender takes the lease (``runs.lease_holder``, ``pid@host``, and ``runs.lease_until``),
renews it every few seconds while it sends and clears it when it ends. A lease past its
``lease_until`` is an interrupted sender's. So ``status`` can tell a run still being sent
from an interrupted one, and a second sender (``resume`` while ``submit`` runs) is refused
instead of recording batches the first one is recording too.

A sending process holds it with :func:`holding`: taken at the start, renewed by a thread
every :data:`defaults.LEASE_RENEW_EVERY` seconds, released at the end, whether the sending
finished, failed or was interrupted. A process killed outright leaves a lease that expires
:data:`defaults.LEASE_SECONDS` after its last renewal. Each renewal reads the run's status
too: once it is ``cancelled`` (``producer cancel``), :meth:`Lease.check` stops the sender.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, or_, select, update

from core import defaults
from core.errors import RunBeingSent, RunCancelled
from db.models import runs, utcnow


@dataclass(frozen=True)
class Sender:
    """A run's sender as its lease names it: ``pid`` and ``host``, and whether it is alive
    (its lease renewed in time)."""

    pid: str
    host: str
    alive: bool
    holder: str

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}"


def holder_of(run: dict[str, Any], now: datetime | None = None) -> Sender | None:
    """The sender a run's lease names, or ``None`` when no sender ever held it or the last
    one ended."""
    holder = run.get("lease_holder")
    if not holder:
        return None
    pid, _, host = str(holder).partition("@")
    until = run.get("lease_until")
    alive = until is not None and aware(until) > (now or utcnow())
    return Sender(pid, host, alive, str(holder))


def take_lease(
    engine: Engine, run_id: int, holder: str, seconds: float, dead: str | None = None
) -> Sender | None:
    """Hold run ``run_id``'s lease for ``seconds`` as ``holder`` (also from ``dead``, a
    holder known to be gone); returns ``None`` when it is held now, or the live sender that
    holds it instead (nothing changed).

    A live sender is found by a read first, so that the refusal waits on no writer: on
    SQLite a sender stopped mid-transaction (Ctrl-Z) holds the write lock, and the
    ``UPDATE`` alone would wait out the busy timeout and fail "database is locked"; on
    PostgreSQL it would wait on the run's row. The ``UPDATE`` still decides the take."""
    now = utcnow()
    with engine.connect() as conn:
        other = holder_of(_lease(conn, run_id), now)
    if other is not None and other.alive and other.holder not in (holder, dead):
        return other
    takeover = [runs.c.lease_holder == dead] if dead else []
    with engine.begin() as conn:
        taken = conn.execute(
            update(runs)
            .where(
                runs.c.id == run_id,
                or_(runs.c.lease_until.is_(None), runs.c.lease_until <= now,
                    runs.c.lease_holder == holder, *takeover),
            )
            .values(lease_holder=holder, lease_until=now + timedelta(seconds=seconds))
        ).rowcount
        if taken:
            return None
        return holder_of(_lease(conn, run_id), now)


def renew_lease(engine: Engine, run_id: int, holder: str, seconds: float) -> str | None:
    """Hold the lease ``seconds`` longer: the run's status (a sender stops once it is
    ``cancelled``), or ``None`` when ``holder`` no longer holds it."""
    with engine.begin() as conn:
        status = conn.execute(
            update(runs)
            .where(runs.c.id == run_id, runs.c.lease_holder == holder)
            .values(lease_until=utcnow() + timedelta(seconds=seconds))
            .returning(runs.c.status)
        ).scalar_one_or_none()
    return None if status is None else str(status)


def release_lease(engine: Engine, run_id: int, holder: str) -> None:
    """Nothing sends the run any more (if ``holder`` still held it)."""
    with engine.begin() as conn:
        conn.execute(
            update(runs)
            .where(runs.c.id == run_id, runs.c.lease_holder == holder)
            .values(lease_holder=None, lease_until=None)
        )


def _lease(conn: Connection, run_id: int) -> dict[str, Any]:
    row = conn.execute(
        select(runs.c.lease_holder, runs.c.lease_until).where(runs.c.id == run_id)
    ).mappings().one()
    return dict(row)


def aware(value: datetime) -> datetime:
    """SQLite gives back naive timestamps of what was stored in UTC."""
    return value if value.tzinfo else value.replace(tzinfo=utcnow().tzinfo)


def this_process() -> str:
    """The lease holder this process writes: ``pid@host``."""
    return f"{os.getpid()}@{socket.gethostname()}"


@dataclass(frozen=True)
class Lease:
    """A run's lease as this process holds it: once a renewal finds the run cancelled it
    sets ``cancelled``, and :meth:`check` raises :class:`RunCancelled` from then on."""

    run_id: int
    cancelled: threading.Event = field(default_factory=threading.Event)

    def check(self) -> None:
        if self.cancelled.is_set():
            raise RunCancelled(
                f"run {self.run_id} was cancelled (`producer cancel`): stopped sending; what "
                f"it stored is kept: see `producer status {self.run_id}`"
            )


@contextmanager
def holding(engine: Engine, run_id: int, *, taken: bool = False) -> Iterator[Lease]:
    """Hold run ``run_id``'s lease for the block (``taken``: this process holds it already,
    having created the run with it); :class:`RunBeingSent` when another live process holds
    it."""
    holder = this_process()
    if not taken:
        other = take_lease(engine, run_id, holder, defaults.LEASE_SECONDS)
        if other is not None and not is_alive(other):
            other = take_lease(engine, run_id, holder, defaults.LEASE_SECONDS, other.holder)
        if other is not None:
            raise RunBeingSent(
                f"run {run_id} is still being sent by {other.describe()} (its `producer "
                f"submit` or `resume` is alive): nothing was changed; follow it with "
                f"`producer wait {run_id}`, or stop that process first"
            )
    stop = threading.Event()
    lease = Lease(run_id)
    renewer = None
    url = engine.url
    # an in-memory SQLite database is seen by no other process, and its one shared
    # connection must not be used from a second thread: no renewer
    if not (url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:")):
        renewer = threading.Thread(
            target=_renew, args=(engine, lease, holder, stop), name="digitscore-lease",
            daemon=True,
        )
        renewer.start()
    try:
        yield lease
    finally:
        stop.set()
        if renewer is not None:
            renewer.join(timeout=defaults.LEASE_RENEW_EVERY)
        try:
            release_lease(engine, run_id, holder)
        except Exception:  # noqa: BLE001, S110 - the lease expires by itself; the error that
            pass  # ended the block (the database gone) matters more


def is_alive(sender: Sender | None) -> bool:
    """Whether a run's sender is alive: its lease renewed in time and, when it ran on this
    host, its process still there (one that failed to clear its lease, the disk full, is
    gone at once rather than when its lease ends)."""
    if sender is None or not sender.alive:
        return False
    if sender.host != socket.gethostname() or not sender.pid.isdigit():
        return True
    try:
        os.kill(int(sender.pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _renew(engine: Engine, lease: Lease, holder: str, stop: threading.Event) -> None:
    while not stop.wait(defaults.LEASE_RENEW_EVERY):
        try:
            status = renew_lease(engine, lease.run_id, holder, defaults.LEASE_SECONDS)
        except Exception:  # noqa: BLE001, S112 - the database is away: the next turn tries again
            continue
        if status == "cancelled":
            lease.cancelled.set()
