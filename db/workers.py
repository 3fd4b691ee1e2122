"""The worker registry: who writes to this database, on which device, and how fast."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, insert, select, update

from db.models import utcnow, workers


def register_worker(
    engine: Engine, name: str, host: str, pid: int, device: str, queue: str,
    signing: str | None = None,
) -> None:
    """Record a starting worker; a restarted one under the same name starts its row afresh.
    ``signing`` names the secret it checks messages with (core/wire.secret_fingerprint)."""
    now = utcnow()
    values = dict(host=host, pid=pid, device=device, queue=queue, started_at=now, last_seen=now,
                  stopped_at=None, batches=0, images=0, last_batch_at=None, signing=signing)
    with engine.begin() as conn:
        found = conn.execute(update(workers).where(workers.c.name == name).values(**values))
        if not found.rowcount:
            conn.execute(insert(workers).values(name=name, **values))


def heartbeat(engine: Engine, name: str) -> None:
    with engine.begin() as conn:
        conn.execute(update(workers).where(workers.c.name == name).values(last_seen=utcnow()))


def count_batch(engine: Engine, name: str, n_images: int) -> None:
    """Add a stored batch to its worker's counts (a heartbeat too)."""
    now = utcnow()
    with engine.begin() as conn:
        conn.execute(
            update(workers)
            .where(workers.c.name == name)
            .values(batches=workers.c.batches + 1, images=workers.c.images + n_images,
                    last_batch_at=now, last_seen=now)
        )


def stop_worker(engine: Engine, name: str) -> None:
    now = utcnow()
    with engine.begin() as conn:
        conn.execute(
            update(workers).where(workers.c.name == name).values(stopped_at=now, last_seen=now)
        )


def live_workers(
    conn: Connection, within: float, now: datetime | None = None
) -> list[dict[str, Any]]:
    """Workers seen in the last ``within`` seconds and not stopped, each with its rate
    (images per second since it started)."""
    now = now or utcnow()
    rows = conn.execute(
        select(workers)
        .where(
            workers.c.stopped_at.is_(None),
            workers.c.last_seen >= now - timedelta(seconds=within),
        )
        .order_by(workers.c.name)
    ).mappings()
    out = []
    for r in rows:
        row = dict(r)
        seconds = (_aware(row["last_seen"]) - _aware(row["started_at"])).total_seconds()
        row["images_per_second"] = row["images"] / seconds if seconds > 0 else None
        out.append(row)
    return out


def _aware(value: datetime) -> datetime:
    """SQLite gives back naive timestamps of what was stored in UTC."""
    return value if value.tzinfo else value.replace(tzinfo=utcnow().tzinfo)


def vanished_workers(
    conn: Connection, within: float, since: float = 3600.0, now: datetime | None = None
) -> list[dict[str, Any]]:
    """Workers that stopped heartbeating (not seen for ``within`` seconds, but in the last
    ``since``) without being marked stopped: killed, or their host lost."""
    now = now or utcnow()
    rows = conn.execute(
        select(workers.c.name, workers.c.last_seen)
        .where(
            workers.c.stopped_at.is_(None),
            workers.c.last_seen < now - timedelta(seconds=within),
            workers.c.last_seen >= now - timedelta(seconds=since),
        )
        .order_by(workers.c.name)
    ).mappings()
    return [{"name": r["name"], "seconds": (now - _aware(r["last_seen"])).total_seconds()}
            for r in rows]
