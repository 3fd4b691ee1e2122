"""``producer cancel`` of a big run being scored: how soon its workers stop storing it.

    python -m bench.cancel [--images 300000] [--after 15] [--broker-url URL]
                           [--postgres-url URL]

A run of ``--images`` real digit PNGs (hard links to 10,000, bench/dataset.py) is submitted
with ``--send paths`` to one default ``worker`` (a pool process per core) on Redis and a
results database (a SQLite file; PostgreSQL too when ``--postgres-url`` is reachable). Once
it has been stored for ``--after`` seconds, ``producer cancel RUN`` runs as a process; then,
until the queue is empty (every message of the run taken, and dropped) and 5 s more, the
run's rows are counted every 0.1 s. Printed: how long the cancel command took, when the run's
last stored batch was stored (``batches.finished_at``) counted from the moment the command
returned (goal: at most 2 s; below 0, before it), the rows added after it returned (goal:
0), how long the worker took to drop the run's waiting messages, and, as the baseline, how
long the run would still have taken at its rate.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the project root is the parent folder
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from contextlib import ExitStack  # noqa: E402

from sqlalchemy import text  # noqa: E402

from bench import common, dataset  # noqa: E402
from bench.reports import log  # noqa: E402
from bench.system import WorkerSet, service_env  # noqa: E402
from db.session import dispose_engines, get_engine  # noqa: E402


def one_value(url: str, sql: str, **params: object) -> object:
    with get_engine(url).connect() as conn:
        return conn.execute(text(sql), params).scalar()


def rows(url: str, run_id: int) -> int:
    return int(one_value(url, "SELECT COUNT(*) FROM predictions WHERE run_id = :r", r=run_id)
               or 0)


def producer(env: dict[str, str], *args: str, wait: bool = True) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", "from producer.cli import main; main()", *args],
        env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if wait:
        out, err = proc.communicate(timeout=600)
        if proc.returncode:
            raise RuntimeError(f"producer {' '.join(args)} failed:\n{err[-2000:]}")
        proc.stdout_text = out  # type: ignore[attr-defined]
    return proc


def measure(url: str, broker: str, root: Path, n: int, after: float, work: Path) -> dict:
    queue = f"bench-cancel-{uuid.uuid4().hex[:8]}"
    env = service_env(broker, queue, url)
    import redis

    client = redis.Redis.from_url(broker)
    with WorkerSet(1, "cpu", env, work, concurrency=None):
        submit = producer(env, "submit", str(root), "--send", "paths", wait=False)
        while not one_value(url, "SELECT MAX(id) FROM runs"):
            time.sleep(0.05)
        run_id = int(one_value(url, "SELECT MAX(id) FROM runs"))  # type: ignore[arg-type]
        while rows(url, run_id) == 0:
            time.sleep(0.1)
        first = time.monotonic()
        while time.monotonic() - first < after:
            time.sleep(0.1)
        before = rows(url, run_id)
        started = time.monotonic()
        producer(env, "cancel", str(run_id))
        returned_at, returned = datetime.now(UTC), time.monotonic()
        at_return = rows(url, run_id)
        rate = at_return / (returned - first)
        while client.llen(queue):
            time.sleep(0.1)
        drained = time.monotonic() - returned
        seen = at_return
        while time.monotonic() - returned < drained + 5:
            seen = max(seen, rows(url, run_id))
            time.sleep(0.1)
        submit.wait(60)
    last = one_value(url, "SELECT MAX(finished_at) FROM batches WHERE run_id = :r AND "
                     "status = 'done'", r=run_id)
    status = one_value(url, "SELECT status FROM runs WHERE id = :r", r=run_id)
    dispose_engines()
    return {
        "rows_before": before, "rows_at_return": at_return, "rows_added_after": seen - at_return,
        "cancel_seconds": returned - started, "drain_seconds": drained,
        "last_stored_after_return": (common.as_utc(last) - returned_at).total_seconds(),  # type: ignore[arg-type]
        "rate": rate, "rest_seconds": (n - at_return) / rate, "status": status,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.cancel", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=300_000)
    p.add_argument("--after", type=float, default=15, help="seconds of scoring before it")
    p.add_argument("--broker-url", default="redis://127.0.0.1:6379/0")
    common.add_data_options(p)
    args = p.parse_args(argv)
    root = dataset.image_set(args.data_dir, args.images, 10_000)
    clf = common.train_classifier()
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="digitscore-can-")))
        urls = {"SQLite": common.sqlite_url(work / "cancel.db")}
        if common.postgres_reachable(args.postgres_url):
            urls["PostgreSQL"] = stack.enter_context(common.postgres_database(args.postgres_url))
        for name, url in urls.items():
            common.store_model(url, clf)
            got = measure(url, args.broker_url, root, args.images, args.after, work)
            log(f"{name}: {got}")
            print(f"\n{name}, a {args.images:,}-image --send paths run cancelled after "
                  f"{got['rows_before']:,} rows ({got['rate']:,.0f} images/s):\n"
                  f"  producer cancel took            {got['cancel_seconds']:6.2f} s\n"
                  f"  last batch stored, from return  {got['last_stored_after_return']:+6.2f} s"
                  f"   (goal <= 2 s)\n"
                  f"  rows added after the return     {got['rows_added_after']:6d}     (goal 0)\n"
                  f"  its waiting messages dropped in {got['drain_seconds']:6.2f} s\n"
                  f"  the run would have gone on for  {got['rest_seconds']:6.0f} s more\n"
                  f"  status                          {got['status']}")


if __name__ == "__main__":
    main()
