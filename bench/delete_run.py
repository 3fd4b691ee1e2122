"""What ``producer delete`` of a big run costs on PostgreSQL, beside the bare statements.

    python -m bench.delete_run [--rows 1000000] [--repeat 1] [--postgres-url URL]

In a fresh PostgreSQL database: a seed run scored for real (10,000 digit PNGs in this
process, bench/reports.seed_run), and runs of ``--rows`` rows made from it by
``INSERT ... SELECT`` (bench/reports.copy_run: its batches, counts and kept lists too). One
such run stays all along, so that the table holds another run as big as the one deleted.
Each round then deletes a fresh copy in each of these ways, in turn, timing each:

- ``producer delete RUN --yes``: a whole process, as a user runs it (with ``producer
  status RUN``, the same process start and no delete, as its floor);
- ``db.deletion.delete_run``, the call alone, in this process;
- a bare ``DELETE FROM predictions WHERE run_id = RUN``: the least a plain DELETE costs (the
  run's other tables are left; they are deleted afterwards, untimed);
- ``TRUNCATE`` and ``DROP TABLE`` of a table holding the same rows (``CREATE TABLE ... AS``,
  no index): what a partition per run would cost to drop, at best.

``VACUUM ANALYZE`` runs before each timing, so that no one pays for another's dead rows.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: the project root is the parent folder
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import Engine, text  # noqa: E402

from bench import common, dataset  # noqa: E402
from bench.reports import SEED_IMAGES, copy_run, log, seed_run  # noqa: E402
from core.text import plural  # noqa: E402
from db.deletion import delete_run  # noqa: E402
from db.session import dispose_engines, get_engine  # noqa: E402


def vacuum(url: str) -> None:
    import psycopg

    with psycopg.connect(url.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")


def producer(url: str, *args: str) -> float:
    argv = [sys.executable, "-c", "from producer.cli import main; main()", *args,
            "--database-url", url]
    env = {**os.environ, "PYTHONPATH": str(common.ROOT)}
    t = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"producer {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return seconds


def fresh_run(engine: Engine, url: str, seed: int, copies: int, work: Path) -> int:
    run_id = copy_run(engine, seed, copies, work)
    dispose_engines()
    vacuum(url)
    return run_id


def timed(work: Any) -> float:
    t = time.perf_counter()
    work()
    return time.perf_counter() - t


def one_round(url: str, seed: int, copies: int, work: Path) -> dict[str, float]:
    engine = get_engine(url)
    out: dict[str, float] = {}
    run_id = fresh_run(engine, url, seed, copies, work)
    out["producer status (the floor)"] = producer(url, "status", str(run_id))
    out["producer delete --yes"] = producer(url, "delete", str(run_id), "--yes")

    run_id = fresh_run(get_engine(url), url, seed, copies, work)
    out["delete_run (the call)"] = timed(lambda: delete_run(get_engine(url), run_id))

    run_id = fresh_run(get_engine(url), url, seed, copies, work)
    with get_engine(url).begin() as conn:
        conn.execute(text("CREATE TABLE same_rows AS SELECT * FROM predictions "
                          "WHERE run_id = :r"), {"r": run_id})
    dispose_engines()
    vacuum(url)

    def bare_delete() -> None:
        with get_engine(url).begin() as conn:
            conn.execute(text("DELETE FROM predictions WHERE run_id = :r"), {"r": run_id})

    out["bare DELETE FROM predictions"] = timed(bare_delete)
    delete_run(get_engine(url), run_id)  # the rest of it, untimed

    def statement(sql: str) -> None:
        with get_engine(url).begin() as conn:
            conn.execute(text(sql))

    out["TRUNCATE of the same rows"] = timed(lambda: statement("TRUNCATE same_rows"))
    statement("INSERT INTO same_rows SELECT * FROM predictions WHERE run_id = "
              "(SELECT MAX(run_id) FROM predictions)")  # refilled, to be dropped
    out["DROP TABLE of the same rows"] = timed(lambda: statement("DROP TABLE same_rows"))
    dispose_engines()
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.delete_run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000, help="rows of the run deleted")
    p.add_argument("--repeat", type=int, default=1, help="rounds (median)")
    common.add_data_options(p)
    args = p.parse_args(argv)
    copies = max(1, args.rows // SEED_IMAGES)
    seed_root = dataset.image_set(args.data_dir, SEED_IMAGES, SEED_IMAGES)
    clf = common.train_classifier()
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="digitscore-del-")))
        url = stack.enter_context(common.postgres_database(args.postgres_url))
        model_id = common.store_model(url, clf)
        engine = get_engine(url)
        seed = seed_run(engine, clf, model_id, seed_root)
        t = time.perf_counter()
        other = copy_run(engine, seed, copies, work)  # stays: the table holds another run
        log(f"run {other}: {copies * SEED_IMAGES:,} rows kept beside, "
            f"built in {time.perf_counter() - t:.1f} s")
        dispose_engines()
        rounds = []
        for i in range(args.repeat):
            rounds.append(one_round(url, seed, copies, work))
            log(f"round {i + 1}: " + ", ".join(f"{k} {v:.2f} s" for k, v in rounds[-1].items()))
    medians = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    bare = medians["bare DELETE FROM predictions"]
    print(f"\nPostgreSQL, a run of {copies * SEED_IMAGES:,} rows deleted beside another as big "
          f"(median of {plural(args.repeat, 'round')}):")
    for name, seconds in medians.items():
        print(f"  {name:32s} {seconds:7.2f} s   {seconds / bare:6.2f} x the bare DELETE")


if __name__ == "__main__":
    main()
