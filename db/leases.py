"""Who sends a run now: the lease a ``submit`` or ``resume`` holds on its run.

A sender takes the lease (``runs.lease_holder``, ``pid@host``, and ``runs.lease_until``),
renews it every few seconds while it sends and clears it when it ends. A lease past its
``lease_until`` is an interrupted sender's. So ``status`` can tell a run still being sent
from an interrupted one, and a second sender (``resume`` while ``submit`` runs) is refused
instead of recording batches the first one is recording too.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, or_, select, update

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
