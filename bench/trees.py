"""Whole ``producer`` processes of several code trees, timed in interleaved rounds: how a
change (a trick, or the plain code instead) moves what a user waits for.

    git archive HEAD | tar -x -C /tmp/plain   # then undo the trick in /tmp/plain
    python -m bench.trees one_image 8 . /tmp/plain --broker redis://127.0.0.1:6403/0

Each round runs every tree once, in alternating order; each run reports its wall time and its
CPU time (user + system, from ``getrusage``), the steadier of the two on a shared machine.
The first tree is the baseline of the ratios. ``one_image`` and ``ten_thousand`` need a
``worker`` running on ``--broker``, queue ``--queue``, writing to ``--database-url`` (an
absolute SQLite path) that holds a model; ``status`` needs a run 1 there; ``handout`` needs
the model and Redis, no worker: every batch stays queued, on a queue of its own, deleted
after (``--send paths``, flow control's bound lifted as in bench/fleet.py).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

from bench.dataset import image_set
from bench.fleet import HANDOUT_MAX_QUEUED_BYTES
from core.wire import queue_lists


def run_producer(tree: Path, env: dict[str, str], *args: str) -> tuple[float, float]:
    """Wall and CPU seconds of one ``producer ARGS`` process of ``tree``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", "from producer.cli import main; main()", *args],
        env={**os.environ, **env, "PYTHONPATH": str(tree.resolve())},
        capture_output=True, text=True,
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"producer {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return wall, cpu


def figures(opts: argparse.Namespace) -> dict[str, Callable[[Path], tuple[float, float]]]:
    work = Path(opts.work)
    work.mkdir(parents=True, exist_ok=True)
    env = {"DIGITSCORE_DATABASE_URL": opts.database_url, "DIGITSCORE_BROKER_URL": opts.broker,
           "DIGITSCORE_QUEUE": opts.queue}

    @lru_cache(maxsize=1)
    def images() -> Path:  # made once, on first use: `status` needs none
        return image_set(Path(opts.data_dir), opts.images, min(opts.images, 100_000))

    def one_image(tree: Path) -> tuple[float, float]:
        folder = work / f"one-{uuid.uuid4().hex[:8]}" / "3"
        folder.mkdir(parents=True)
        first = next(images().rglob("*.png"))
        (folder / first.name).write_bytes(first.read_bytes())
        return run_producer(tree, env, "submit", str(folder.parent), "--wait")

    def ten_thousand(tree: Path) -> tuple[float, float]:
        folder = work / "ten-thousand"
        if not folder.exists():
            for src in sorted(images().rglob("*.png"))[:10_000]:
                (folder / src.parent.name).mkdir(parents=True, exist_ok=True)
                os.link(src, folder / src.parent.name / src.name)
        return run_producer(tree, env, "submit", str(folder), "--wait")

    def status(tree: Path) -> tuple[float, float]:
        return run_producer(tree, {"DIGITSCORE_DATABASE_URL": opts.database_url}, "status", "1")

    def handout(tree: Path) -> tuple[float, float]:
        import redis

        queue = f"bench-trees-{uuid.uuid4().hex[:8]}"
        try:
            return run_producer(
                tree, {**env, "DIGITSCORE_QUEUE": queue,
                       "DIGITSCORE_MAX_QUEUED_BYTES": str(HANDOUT_MAX_QUEUED_BYTES)},
                "submit", str(images()), "--send", "paths")
        finally:
            redis.Redis.from_url(opts.broker).delete(*queue_lists(queue))

    return {"one_image": one_image, "ten_thousand": ten_thousand, "status": status,
            "handout": handout}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("figure", choices=("one_image", "ten_thousand", "status", "handout"))
    parser.add_argument("rounds", type=int)
    parser.add_argument("trees", nargs="+", type=Path)
    parser.add_argument("--broker", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--queue", default="digitscore")
    parser.add_argument("--database-url", default=f"sqlite:///{Path.cwd() / 'digitscore.db'}")
    parser.add_argument("--images", type=int, default=100_000, help="images of `handout`")
    parser.add_argument("--data-dir", default=os.path.join(
        os.environ.get("TMPDIR", "/tmp"), "digitscore-bench"))
    parser.add_argument("--work", default=os.path.join(
        os.environ.get("TMPDIR", "/tmp"), "digitscore-bench-trees"))
    opts = parser.parse_args()
    measure = figures(opts)[opts.figure]
    for tree in opts.trees:  # warm the page cache and the .pyc files
        measure(tree)
    runs: dict[Path, list[tuple[float, float]]] = {tree: [] for tree in opts.trees}
    for r in range(opts.rounds):
        for tree in opts.trees if r % 2 == 0 else opts.trees[::-1]:
            runs[tree].append(measure(tree))
    base = runs[opts.trees[0]]
    print(f"{opts.figure}, {opts.rounds} interleaved rounds, load {os.getloadavg()[0]:.1f}")
    for tree, times in runs.items():
        walls, cpus = [w for w, _ in times], [c for _, c in times]
        ratio = statistics.median(w / b for (w, _), (b, _) in zip(times, base, strict=True))
        print(f"  {tree}: wall median {statistics.median(walls):.3f} s (ratio {ratio:.3f}), "
              f"CPU median {statistics.median(cpus):.3f} s (min {min(cpus):.3f})")


if __name__ == "__main__":
    main()
