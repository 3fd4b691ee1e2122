"""Fairness between runs (docs/fairness.md): a one-image ``submit --wait`` submitted while a big
``--send paths`` run is scored by the same default ``worker``, against the same one-image run
alone; and the big run's throughput with and without a small run beside it. Whole processes,
timed from outside, in interleaved rounds, so that the ratios come from one command on a
shared machine.

    python -m bench.fairness redis://127.0.0.1:6379/N [--images 300000] [--rounds 3]
    python -m bench.fairness redis://127.0.0.1:6379/N --tree /tmp/main   # the code before

Each round: three one-image runs alone (their median), then a big run alone, then a big run
with one one-image run submitted 1 s after its first batch is stored. Each big run is sent
whole onto a holding queue and handed to the worker at once, so it is scored from a full
backlog (the one the issue measured, where the producer handed out faster than the worker
scored; on a loaded host the walk may be slower than the worker, and leave none); its
throughput is its images over release -> done. The order of the two big runs alternates
between rounds. A one-image run's time is the whole
process's, and of that the part from its run's creation to done (waiting on the queue and
scored), read from the database. ``--tree`` runs the worker and every producer from that
code tree instead (a database of its own, made by its own code).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

from bench.common import as_utc
from bench.dataset import image_set
from bench.system import WorkerSet, delete_queue, service_env
from core.wire import queue_lists

MODEL = ("import sys; from bench.common import train_classifier, store_model; "
         "store_model(sys.argv[1], train_classifier())")


def producer(env: dict[str, str], *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", "from producer.cli import main; main()", *args],
        env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def one_image(env: dict[str, str], work: Path, image: Path) -> tuple[float, float]:
    """Wall seconds of ``producer submit DIR --wait`` on a directory of one image, and of
    that the seconds from its run's creation to done."""
    folder = work / f"one-{uuid.uuid4().hex[:8]}" / "3"
    folder.mkdir(parents=True)
    shutil.copy(image, folder / image.name)
    start = time.perf_counter()
    proc = producer(env, "submit", str(folder.parent), "--wait")
    _out, err = proc.communicate(timeout=600)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"one-image submit failed:\n{err[-2000:]}")
    run = _row(env["DIGITSCORE_DATABASE_URL"], latest_run(env["DIGITSCORE_DATABASE_URL"])["id"])
    return wall, _seconds(run)


def _seconds(run: dict) -> float:
    return as_utc(run["finished_at"]).timestamp() - as_utc(run["created_at"]).timestamp()


def read(url: str, sql: str, *params: object) -> dict | None:
    """One row of the SQLite database at ``url``, read with sqlite3: the code under test
    (``--tree``) owns the schema, so this process never migrates it."""
    with sqlite3.connect(url.removeprefix("sqlite:///"), timeout=30) as conn:
        conn.row_factory = sqlite3.Row
        row = conn.execute(sql, params).fetchone()
    return None if row is None else dict(row)


def latest_run(url: str) -> dict:
    """The newest run, with how many of its batches are stored (``{"id": 0}``: none yet)."""
    return read(url, "SELECT id, (SELECT COUNT(*) FROM batches b WHERE b.run_id = runs.id "
                "AND b.status = 'done') AS stored FROM runs ORDER BY id DESC LIMIT 1"
                ) or {"id": 0, "stored": 0}


def big_run(env: dict[str, str], big: Path, work: Path, image: Path | None) -> dict:
    """A big ``--send paths`` run, sent whole onto a holding queue that no worker reads,
    then handed to the worker's queue at once (each priority list renamed, in one MULTI):
    the backlog a big run leaves when its producer hands out faster than the workers score,
    whatever this host's load. Its throughput from that moment to done, and (``image``
    given) the seconds of a one-image run submitted 1 s after its first batch is stored."""
    import redis

    url, queue = env["DIGITSCORE_DATABASE_URL"], env["DIGITSCORE_QUEUE"]
    hold = f"{queue}.hold"
    proc = producer({**env, "DIGITSCORE_QUEUE": hold}, "submit", str(big), "--send", "paths")
    _out, err = proc.communicate(timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"big submit failed:\n{err[-2000:]}")
    big_id = latest_run(url)["id"]
    client = redis.Redis.from_url(env["DIGITSCORE_BROKER_URL"])
    pipe = client.pipeline(transaction=True)
    for held, target in zip(queue_lists(hold), queue_lists(queue), strict=True):
        if client.exists(held):
            pipe.rename(held, target)
    released = time.time()
    pipe.execute()
    small: list[tuple[float, float]] = []
    if image is not None:
        while latest_run(url)["stored"] < 1:
            time.sleep(0.05)
        time.sleep(1.0)
        small.append(one_image(env, work, image))
    while (row := _row(url, big_id))["status"] != "done":
        time.sleep(0.05)
    seconds = as_utc(row["finished_at"]).timestamp() - released
    return {"run": big_id, "images": row["n_images"], "seconds": seconds,
            "rate": row["n_images"] / seconds, "small_walls": small,
            "small_done_first": image is not None and _small_done_first(url, big_id)}


def _small_done_first(url: str, big_id: int) -> bool:
    """Whether the run after ``big_id`` (the small one) was done before it."""
    row = read(url, "SELECT (SELECT finished_at FROM runs WHERE id = ?) < "
               "(SELECT finished_at FROM runs WHERE id = ?) AS first", big_id + 1, big_id)
    return bool(row and row["first"])


def _row(url: str, run_id: int) -> dict:
    row = read(url, "SELECT status, n_images, created_at, finished_at FROM runs WHERE id = ?",
               run_id)
    assert row is not None
    return row


def _status(url: str, run_id: int) -> str:
    return str(_row(url, run_id)["status"])


def measure(opts: argparse.Namespace, tree: Path, big: Path, work: Path) -> dict:
    db = work / f"fairness-{uuid.uuid4().hex[:8]}.db"
    url = f"sqlite:///{db}"
    queue = f"bench-fairness-{uuid.uuid4().hex[:8]}"
    env = {**service_env(opts.broker, queue, url), "PYTHONPATH": str(tree.resolve())}
    subprocess.run([sys.executable, "-c", MODEL, url], env={**os.environ, **env}, check=True)
    image = next(big.rglob("*.png"))
    rounds = []
    with WorkerSet(1, "cpu", env, work, concurrency=None):
        one_image(env, work, image)  # warm the page cache and the worker's model
        for r in range(opts.rounds):
            alone = statistics.median(one_image(env, work, image)[0] for _ in range(3))
            order = (None, image) if r % 2 == 0 else (image, None)
            runs = {("with" if i is not None else "alone"): big_run(env, big, work, i)
                    for i in order}
            rounds.append({"one_image_alone": alone, **runs})
    delete_queue(opts.broker, queue)
    db.unlink(missing_ok=True)
    return summarise(rounds)


def summarise(rounds: list[dict]) -> dict:
    walls = [w for r in rounds for w, _ in r["with"]["small_walls"]]
    queued = [q for r in rounds for _, q in r["with"]["small_walls"]]
    alone = [r["one_image_alone"] for r in rounds]
    return {
        "one_image_alone_s": statistics.median(alone),
        "one_image_beside_big_s": {"median": statistics.median(walls), "max": max(walls),
                                   "n": len(walls), "created_to_done_median":
                                   statistics.median(queued)},
        "small_done_before_big": sum(r["with"]["small_done_first"] for r in rounds),
        "big_rate_alone": statistics.median(r["alone"]["rate"] for r in rounds),
        "big_rate_with_small": statistics.median(r["with"]["rate"] for r in rounds),
        "big_rate_ratio": statistics.median(r["with"]["rate"] / r["alone"]["rate"]
                                            for r in rounds),
        "rounds": rounds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("broker", help="redis://HOST:PORT/DB (a queue of its own is used)")
    parser.add_argument("--images", type=int, default=300_000, help="images of the big run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tree", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--data-dir", default=os.path.join(
        os.environ.get("TMPDIR", "/tmp"), "digitscore-bench"))
    parser.add_argument("--work", default=os.path.join(
        os.environ.get("TMPDIR", "/tmp"), "digitscore-bench-fairness"))
    opts = parser.parse_args()
    work = Path(opts.work)
    work.mkdir(parents=True, exist_ok=True)
    # `python -c` puts the working directory first on sys.path: run every process from the
    # work directory, so that the code they run is --tree's (PYTHONPATH), not the caller's
    os.chdir(work)
    big = image_set(Path(opts.data_dir), opts.images, min(opts.images, 100_000))
    result = measure(opts, opts.tree, big, work)
    print(f"fairness: {opts.images:,}-image --send paths run, one default worker, "
          f"{opts.rounds} rounds, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}, "
          f"tree {opts.tree}")
    beside = result["one_image_beside_big_s"]
    print(f"  one-image submit --wait alone: {result['one_image_alone_s']:.2f} s; beside the "
          f"big run: median {beside['median']:.2f} s, max {beside['max']:.2f} s "
          f"({beside['n']} runs; of which its run's creation to done, median "
          f"{beside['created_to_done_median']:.2f} s); done before the big run in "
          f"{result['small_done_before_big']} of {opts.rounds} rounds")
    print(f"  big run: {result['big_rate_alone']:,.0f} images/s alone, "
          f"{result['big_rate_with_small']:,.0f} with the small runs "
          f"(ratio {result['big_rate_ratio']:.3f})")
    print(json.dumps(result, default=str))


if __name__ == "__main__":
    main()
