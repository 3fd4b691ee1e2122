"""Holding a run's lease (db/leases.py) while this process sends it: taken at the start,
renewed by a thread every :data:`defaults.LEASE_RENEW_EVERY` seconds, released at the end,
whether the sending finished, failed or was interrupted. A process killed outright leaves a
lease that expires :data:`defaults.LEASE_SECONDS` after its last renewal. Each renewal reads
the run's status too: once it is ``cancelled`` (``producer cancel``), :meth:`Lease.check`
stops the sender."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine

from core import defaults
from core.errors import RunBeingSent, RunCancelled
from db.leases import Sender, release_lease, renew_lease, take_lease


def this_process() -> str:
    """The lease holder this process writes: ``pid@host``."""
    return f"{os.getpid()}@{socket.gethostname()}"


class Lease:
    """A run's lease as this process holds it: :meth:`check` raises :class:`RunCancelled`
    once a renewal found the run cancelled."""

    def __init__(self, run_id: int) -> None:
        self.run_id = run_id
        self.cancelled = threading.Event()

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
    if not _private(engine):
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


def _private(engine: Engine) -> bool:
    """An in-memory SQLite database: no other process can see the run, and its one shared
    connection must not be used from a second thread."""
    return engine.url.get_backend_name() == "sqlite" and engine.url.database in (
        None, "", ":memory:")
