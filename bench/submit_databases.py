"""Whole-process ``producer submit DIR --wait`` into PostgreSQL against into SQLite.

    python -m bench.submit_databases [--images 100000] [--repeat 3] [--broker-url URL]

One default ``worker`` (one pool process per core) per database, each on a queue of its own
on the same Redis, both started before the first round; in each round the same directory of
digit PNGs is submitted to each in turn (which goes first alternates), as a shell runs
``producer submit DIR --wait``: timed from the process's start to its exit, and from its
walk's start to the run's ``done`` (bench/system.py). The ratio is PostgreSQL's rate over
SQLite's in the same round; the figure is the median of the rounds' ratios. Needs Redis and
the PostgreSQL of ``--postgres-url`` (a database of its own is created and dropped).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import uuid
from contextlib import ExitStack
from pathlib import Path

from bench import common, dataset, system
from bench.throughput import DEFAULT_DATA_DIR


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=100_000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    p.add_argument("--broker-url", default="redis://127.0.0.1:6379/8")
    p.add_argument("--postgres-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    args = p.parse_args(argv)
    root = dataset.image_set(args.data_dir, args.images, args.images)
    clf = common.train_classifier()
    found: dict[str, list[tuple[float, float]]] = {"sqlite": [], "postgresql": []}
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        urls = {"sqlite": common.sqlite_url(work / "results.db"),
                "postgresql": stack.enter_context(common.postgres_database(args.postgres_url))}
        envs = {}
        for name, url in urls.items():
            common.store_model(url, clf)
            queue = f"bench-{uuid.uuid4().hex[:8]}"
            stack.callback(system.delete_queue, args.broker_url, queue)
            envs[name] = system.service_env(args.broker_url, queue, url)
            stack.enter_context(system.WorkerSet(1, "cpu", envs[name], work, None))
        for r in range(args.repeat):
            order = list(urls) if r % 2 == 0 else list(reversed(urls))
            for name in order:
                result = system.submit_and_wait(root, envs[name], work)
                found[name].append((result.n_images / (result.wall_seconds or 1), result.rate))
                print(f"round {r + 1}/{args.repeat} {name}: {found[name][-1][0]:,.0f} images/s "
                      f"whole process, {found[name][-1][1]:,.0f} from the walk to done; "
                      f"load average {os.getloadavg()[0]:.1f}", flush=True)
    for i, what in enumerate(("whole process", "walk to done")):
        ratios = [pg[i] / lite[i] for pg, lite in zip(found["postgresql"], found["sqlite"],
                                                       strict=True)]
        print(f"{what}: PostgreSQL {statistics.median(x[i] for x in found['postgresql']):,.0f}"
              f" images/s, SQLite {statistics.median(x[i] for x in found['sqlite']):,.0f}; "
              f"PostgreSQL / SQLite {statistics.median(ratios):.2f} "
              f"({', '.join(f'{x:.2f}' for x in ratios)})")
    print(f"at {time.strftime('%H:%M:%S')}, load average "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
