"""Cancelling and deleting runs from the producer's side: the database's part
(db/cancellation.py, db/deletion.py), then the run's payloads left in Redis, when a broker
is set. A broker that cannot be reached does not undo the database's part: the payloads
expire by themselves (``DIGITSCORE_PAYLOAD_TTL``), and a worker that gets one of the run's
messages finds the run cancelled or gone and drops it."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import Engine

from core import defaults, wire
from core.errors import BadInput
from core.settings import Settings
from core.text import first_line, mask_url, plural
from db.cancellation import Cancelled, cancel_run
from db.deletion import Deleted, delete_run


@dataclass(frozen=True)
class Removed:
    """The payloads a cancel or a delete removed from Redis (``None``: no broker set), and
    why none could be, if so."""

    payloads: int | None = None
    problem: str | None = None

    def describe(self) -> str:
        if self.problem:
            return f"its payloads left in Redis ({self.problem}; they expire by themselves)"
        if self.payloads is None:
            return f"no broker set ({defaults.BROKER_URL_ENV}): no payload looked for"
        return f"{plural(self.payloads, 'payload')} deleted from Redis"


@contextmanager
def payload_store(settings: Settings) -> Iterator[Any]:
    """The Redis client of the settings' broker, for the length of the block."""
    app = wire.make_app(settings)
    connection = app.connection_for_write()
    try:
        yield wire.require_redis(connection, str(settings.broker_url))
    finally:
        connection.release()
        app.close()


def delete_payloads(settings: Settings, run_id: int, token: str) -> Removed:
    """Delete every payload of run ``run_id`` (keys ``core/wire.payload_key``) from Redis."""
    if not settings.broker_url:
        return Removed()
    pattern = wire.payload_key(wire.BatchMessage(run_id, 0, token))[:-1] + "*"
    try:
        with payload_store(settings) as client:
            n = 0
            keys = list(client.scan_iter(match=pattern, count=1000))
            for start in range(0, len(keys), 500):
                n += int(client.delete(*keys[start:start + 500]))
    except Exception as e:  # noqa: BLE001 - the database's part is done and stays
        return Removed(None, f"{mask_url(settings.broker_url)}: {first_line(e)}")
    return Removed(n)


def cancel(engine: Engine, settings: Settings, run_id: int) -> tuple[Cancelled, Removed]:
    """Cancel run ``run_id`` in the database, then delete its payloads."""
    cancelled = cancel_run(engine, run_id)
    if cancelled.was == "done":
        return cancelled, Removed()
    return cancelled, delete_payloads(settings, run_id, cancelled.token)


def delete(engine: Engine, settings: Settings, run_id: int) -> tuple[Deleted, Removed]:
    """Delete run ``run_id`` from the database, then its payloads left in Redis."""
    deleted = delete_run(engine, run_id)
    return deleted, delete_payloads(settings, run_id, deleted.token)


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_age(text: str) -> timedelta:
    """``30d``, ``12h``, ``90m``, ``2w``, ``3600s`` (or a bare number of days)."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text.lower())
    if found is None:
        raise BadInput(f"{text!r} is not an age: give a number and a unit, e.g. 30d, 12h, 2w")
    number, unit = found.groups()
    return timedelta(seconds=float(number) * _UNITS[unit or "d"])


def describe_cancel(engine: Engine, cancelled: Cancelled, removed: Removed) -> str:
    """One line on what a cancel did, with the counts of what the run stored."""
    from db.queries import get_run

    run_id = cancelled.run_id
    with engine.connect() as conn:
        run = get_run(conn, run_id)
    stored = run["n_scored"] + run["n_failed"]
    total = "?" if run["n_images"] is None else f"{run['n_images']:,}"
    if cancelled.was == "done":
        return f"run {run_id} is done ({stored:,}/{total} images stored): nothing to cancel"
    again = " again" if cancelled.was == "cancelled" else ""
    return (
        f"run {run_id} cancelled{again}: {stored:,}/{total} images stored "
        f"({run['n_scored']:,} scored, {run['n_failed']:,} failed) and kept; "
        f"{plural(len(cancelled.stopped), 'queued batch', 'queued batches')} stopped; "
        f"{removed.describe()}"
    )
