"""What limits a fleet before the workers do: the producer's hand-out rate with no worker
running, in each ``--send`` mode, at two directory sizes (the difference of the two gives
the rate a long run settles at, and the fixed cost of the process); what Redis holds
meanwhile; and the fixed cost of a one-image ``submit --wait`` to running workers. All whole
processes, timed from outside."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import text

from bench.system import service_env
from core.wire import queue_lists
from db.session import dispose_engines, get_engine

MODES = ("bytes", "paths")
#: Flow control's bound while handing out with no worker: every batch stays queued, and the
#: producer must not wait for workers that will never come (Redis here has no maxmemory).
HANDOUT_MAX_QUEUED_BYTES = 8 * 2**30


@dataclass(frozen=True)
class Handout:
    mode: str
    n_images: int
    seconds: float  # the whole producer process, start to exit
    redis_bytes: int  # what the run holds in Redis with every batch queued: its peak

    @property
    def rate(self) -> float:
        return self.n_images / self.seconds


def producer(*args: str) -> list[str]:
    return [sys.executable, "-c", "from producer.cli import main; main()", *args]


def handout(
    directory: Path, mode: str, broker_url: str, db_url: str, work: Path,
    extra: Sequence[str] = (),
) -> Handout:
    """``producer submit DIRECTORY --send MODE`` with no worker: every batch is queued, on a
    queue of its own that is deleted afterwards with the run's payloads. What the run then
    holds in Redis is its peak (nothing has been taken), counted key by key with
    ``MEMORY USAGE`` so that other tenants of a shared Redis do not blur it."""
    queue = f"bench-handout-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, **service_env(broker_url, queue, db_url),
           "DIGITSCORE_MAX_QUEUED_BYTES": str(HANDOUT_MAX_QUEUED_BYTES)}
    start = time.perf_counter()
    proc = subprocess.run(producer("submit", str(directory), "--send", mode, *extra), env=env,
                          capture_output=True, text=True, timeout=1800, cwd=work)
    seconds = time.perf_counter() - start
    with get_engine(db_url).connect() as conn:
        run = conn.execute(text(
            "SELECT id, token, n_images FROM runs ORDER BY id DESC LIMIT 1")).mappings().one()
    dispose_engines()
    held = _held_then_forgotten(broker_url, queue, int(run["id"]), str(run["token"]))
    if proc.returncode != 0:
        raise RuntimeError(f"producer submit failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return Handout(mode, int(run["n_images"]), seconds, held)


def _held_then_forgotten(broker_url: str, queue: str, run_id: int, token: str) -> int:
    """The bytes Redis uses for the run's queue (each of its priority lists) and payloads;
    then deletes them."""
    import redis

    client = redis.Redis.from_url(broker_url)
    lists = [name.encode() for name in queue_lists(queue) if client.exists(name)]
    keys = [*lists, *client.scan_iter(f"digitscore:payload:{run_id}:{token}:*",
                                              count=1000)]
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.memory_usage(key, samples=0)
    held = sum(n or 0 for n in pipe.execute())
    for i in range(0, len(keys), 1000):
        client.delete(*keys[i : i + 1000])
    return held


def one_image_seconds(image: Path, env: dict[str, str], work: Path) -> float:
    """Whole-process wall time of ``producer submit DIR --wait`` for a directory of one image,
    to workers already running with ``env``."""
    directory = work / f"one-{uuid.uuid4().hex[:8]}" / "3"
    directory.mkdir(parents=True)
    (directory / image.name).write_bytes(image.read_bytes())
    start = time.perf_counter()
    proc = subprocess.run(producer("submit", str(directory.parent), "--wait"),
                          env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=300, cwd=work)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"one-image submit failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return seconds


def steady_rate(small: tuple[int, float], large: tuple[int, float]) -> tuple[float, float]:
    """From two hand-outs, ``(images, seconds)`` of a small and a large directory: the rate
    a long run settles at (images/s: the extra images over the extra seconds) and the fixed
    cost of the process (seconds: what is left of the small run's time at that rate)."""
    (n_small, t_small), (n_large, t_large) = small, large
    if n_large <= n_small or t_large <= t_small:
        raise ValueError(f"no steady rate from {small} and {large}")
    rate = (n_large - n_small) / (t_large - t_small)
    return rate, t_small - n_small / rate
