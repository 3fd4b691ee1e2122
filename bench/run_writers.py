"""Rows per second the project stores on PostgreSQL, beside what a bare COPY takes there.

    python -m bench.run_writers [--writers 1 4] [--batches 24] [--batch-size 4096] [--repeat 3]
        [--sqlite [--sqlite-against COMMIT]]

In each round, in turn: 1 and 4 writer processes storing batches of one run with
``db.batch_life.store_batch`` (ready-made columns, as scoring hands them over: no decoding,
no scoring), 4 writers of 4 different runs, and the same numbers of processes COPYing the
same rows, a batch a transaction, into ``bare_predictions``: a logged table of the same
columns with no key, no index and no foreign key (binary COPY of tuples made beforehand,
psycopg's ``write_row``: as a plain script writes it); then into the same table with the
indexes of ``predictions``, the floor those set with no project code. Each figure is the
median of the rounds, and each ratio is a rate over the bare rate of the same number of
writers in the same round, so that the machine's load falls on both.

How much the writers wait on each other is shown apart from it, as it does not depend on the
machine's cores: the share of PostgreSQL's samples of the writers' sessions (every 10 ms, from
``pg_stat_activity``) that found one waiting for a lock. The CPU a batch is the writers'
processes' and the whole server's (every process of its postmaster but the sampler's
session), read from ``/proc`` when the server runs on this host. ``--sqlite`` also times one
writer on a fresh SQLite file, and ``--sqlite-against COMMIT`` one writer of that commit's tree
(``git archive``; its own schema and ``db.queries.store_batch_results``, as at 18189bd, in a
process of its own) on the same rows, in the same round. Needs the PostgreSQL of
``--postgres-url``; a database of its own is created and dropped.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import queue
import resource
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import text

from bench.common import ROOT, postgres_database, sqlite_url, store_model, train_classifier
from core.columns import ROW_KEYS, PredictionRow, batch_columns
from core.text import plural
from db.batch_life import record_batch, store_batch
from db.queries import create_run, finish_submission
from db.session import dispose_engines, get_engine, normalize_url


def batch_rows(seq: int, size: int) -> list[PredictionRow]:
    rows: list[PredictionRow] = []
    for i in range(size):
        label = str(i % 10)
        rows.append({
            "path": f"d{seq}/img{i:05d}.png", "label": label, "pred_l1": label,
            "pred_l2": label, "pred_sgd": str((i + 1) % 10), "dist_l1": 0.1 + i / size,
            "dist_l2": 0.2, "prob_sgd": 0.9 - i / size / 2, "error": None,
        })  # fmt: skip
    return rows


def _cpu_seconds() -> float:
    """CPU seconds (user + system) of this process."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _stat(pid: int) -> list[str]:
    """``/proc/PID/stat``'s fields after the command's name (``[0]`` is the state)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def _postmaster(url: str) -> int | None:
    """The pid of the PostgreSQL server's postmaster, if it runs on this host (the parent of
    a session's process), else ``None``."""
    with get_engine(url).connect() as conn:
        backend = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
    try:
        return int(_stat(backend)[1])
    except (OSError, IndexError, ValueError):
        return None


def _server_seconds(postmaster: int | None, leave_out: int | None) -> float:
    """CPU seconds the whole PostgreSQL server has spent: its postmaster's own and what its
    exited children spent (the postmaster waits for them: an index build's parallel workers),
    and every live child's (the writers' sessions, the WAL writer, the checkpointer) but the
    session ``leave_out`` (the lock-wait sampler's: the benchmark's, not the writers'); 0 for
    a server that is not on this host."""
    if postmaster is None:
        return 0.0
    try:
        ticks = sum(map(int, _stat(postmaster)[11:15]))
    except (OSError, IndexError, ValueError):
        return 0.0
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == leave_out:
            continue
        try:
            fields = _stat(int(name))
        except OSError:
            continue  # gone meanwhile: its time is the postmaster's children's now
        if fields[1] == str(postmaster):
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def _write(url: str, jobs: list[tuple[int, int]], size: int, ready: Any, times: Any) -> None:
    """Store each (run, batch) of ``jobs`` with the project's code; put the wall-clock
    times of the first write's start and the last commit's end in ``times``, and the CPU
    seconds this process spent between them."""
    # as scoring hands them over (core.scoring.score_images): columns
    prepared = [(run_id, seq, batch_columns(batch_rows(seq, size))) for run_id, seq in jobs]
    engine = get_engine(url)
    with engine.connect():  # connected, schema checked: only the writes are timed
        pass
    ready.wait()  # every writer begins at once
    start, cpu = time.time(), _cpu_seconds()
    for run_id, seq, columns in prepared:
        store_batch(engine, run_id, seq, columns)  # on the pool's one connection, in turn
    times.put((start, time.time(), _cpu_seconds() - cpu))
    dispose_engines()


BARE_TABLE = (
    "CREATE TABLE IF NOT EXISTS bare_predictions (run_id int NOT NULL, batch_seq int NOT NULL, "
    "path text NOT NULL, label text, pred_l1 text, pred_l2 text, pred_sgd text, dist_l1 float8, "
    "dist_l2 float8, prob_sgd float8, error text, scored_at timestamptz NOT NULL)"
)
#: ``bare_predictions`` with the indexes of ``predictions`` (db/models.py): the floor that
#: the unique (run_id, path) index sets, with no project code
INDEXES = (
    "CREATE UNIQUE INDEX IF NOT EXISTS bare_run_path ON bare_predictions (run_id, path)",
    "CREATE INDEX IF NOT EXISTS bare_failures ON bare_predictions (run_id, path) "
    "WHERE error IS NOT NULL",
)
_BARE_TYPES = ["int4", "int4", "text", "text", "text", "text", "text", "float8", "float8",
               "float8", "text", "timestamptz"]


def _copy_bare(
    url: str, jobs: list[tuple[int, int]], size: int, ready: Any, times: Any
) -> None:
    """COPY the same rows into ``bare_predictions``, a batch a transaction: the floor."""
    import psycopg

    at = datetime.now(UTC)
    prepared = [
        [(run_id, seq, *(r[k] for k in ROW_KEYS), at)  # type: ignore[literal-required]
         for r in batch_rows(seq, size)]
        for run_id, seq in jobs
    ]
    dsn = normalize_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(dsn) as conn:
        ready.wait()
        start, cpu = time.time(), _cpu_seconds()
        for rows in prepared:
            with conn.cursor() as cursor, cursor.copy(
                "COPY bare_predictions FROM STDIN (FORMAT BINARY)"
            ) as copy:
                copy.set_types(_BARE_TYPES)
                for row in rows:
                    copy.write_row(row)
            conn.commit()
        times.put((start, time.time(), _cpu_seconds() - cpu))


#: lock waits, extend waits (shares of samples), the writers' and the whole server's CPU ms
#: a batch
Waits = tuple[float, float, float, float]

_SAMPLE = text(
    "SELECT wait_event_type = 'Lock' AND wait_event <> 'extend', wait_event = 'extend' "
    "FROM pg_stat_activity WHERE datname = current_database() AND state = 'active' "
    "AND pid <> pg_backend_pid()"
)


def _sample_lock_waits(
    url: str, stop: threading.Event, counts: list[int], pid: queue.Queue[int]
) -> None:
    """Every 10 ms until ``stop``: add to ``counts`` the writers' sessions waiting for a lock
    on a row or transaction, those waiting to extend a table (which a bare COPY of several
    writers into one table waits for too), and the writers' sessions at work. Puts its own
    session's pid in ``pid`` first."""
    with get_engine(url).connect() as conn:
        pid.put(conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one())
        while not stop.is_set():
            for lock, extend in conn.execute(_SAMPLE):
                counts[0] += bool(lock)
                counts[1] += bool(extend)
                counts[2] += 1
            conn.rollback()
            time.sleep(0.01)


def new_runs(url: str, model_id: int, n_runs: int, batches: int, size: int) -> list[int]:
    """``n_runs`` runs sharing ``batches`` recorded batches, each run's submission finished
    (so that every writer settles as in a real run)."""
    engine = get_engine(url)
    ids = []
    with engine.begin() as conn:
        for r in range(n_runs):
            run_id, _token = create_run(conn, model_id, "/bench", "celery")
            for seq in range(r, batches, n_runs):
                record_batch(conn, run_id, seq, [f"d{seq}/img{i:05d}.png" for i in range(size)],
                             0)
            ids.append(run_id)
    for r, run_id in enumerate(ids):
        finish_submission(engine, run_id, len(range(r, batches, n_runs)) * size, 0)
    return ids


def measure(
    url: str, target: Any, jobs: list[list[tuple[int, int]]], size: int
) -> tuple[float, Waits]:
    """Rows per second of one process per share of ``jobs`` running ``target``, from the
    first write's start to the last commit (each process's own clock readings: a process's
    exit is not timed); the share of samples of working writers that found one waiting
    for a lock or to extend the table; and the CPU milliseconds a batch of the writers'
    processes and of the whole database server (steadier than rates on a loaded machine)."""
    postmaster = _postmaster(url) if url.startswith("postgresql") else None
    dispose_engines()
    ctx = multiprocessing.get_context("fork")  # the children start with the imports made
    ready = ctx.Barrier(len(jobs) + 1)
    times = ctx.Queue()
    procs = [ctx.Process(target=target, args=(url, share, size, ready, times))
             for share in jobs]
    for p in procs:
        p.start()
    stop, counts, sampler_pid = threading.Event(), [0, 0, 0], queue.Queue[int]()
    sampler = threading.Thread(target=_sample_lock_waits, args=(url, stop, counts, sampler_pid))
    sampling = None
    if url.startswith("postgresql"):
        sampler.start()
        sampling = sampler_pid.get(timeout=60)
    ready.wait()  # every writer has its rows and its connection
    server = _server_seconds(postmaster, sampling)
    spans = [times.get(timeout=600) for _ in procs]
    server = _server_seconds(postmaster, sampling) - server
    stop.set()
    for p in procs:
        p.join()
        if p.exitcode:
            raise RuntimeError(f"a writer exited with {p.exitcode}")
    elapsed = max(s[1] for s in spans) - min(s[0] for s in spans)
    if sampler.is_alive():
        sampler.join()
    n_batches = sum(map(len, jobs))
    active = max(1, counts[2])
    return n_batches * size / elapsed, (
        counts[0] / active, counts[1] / active,
        sum(s[2] for s in spans) / n_batches * 1000, server / n_batches * 1000,
    )


def product(url: str, model_id: int, writers: int, n_runs: int, batches: int,
            size: int) -> tuple[float, Waits]:
    ids = new_runs(url, model_id, n_runs, batches, size)
    jobs: list[list[tuple[int, int]]] = [[] for _ in range(writers)]
    for seq in range(batches):
        jobs[seq % writers].append((ids[seq % n_runs], seq))
    rate, waits = measure(url, _write, jobs, size)
    with get_engine(url).connect() as conn:
        for run_id in ids:
            status, n = conn.execute(text("SELECT status, n_scored FROM runs WHERE id = :r"),
                                     {"r": run_id}).one()
            assert status == "done" and n == batches // n_runs * size, (run_id, status, n)
    return rate, waits


def bare(url: str, writers: int, batches: int, size: int,
         indexed: bool = False) -> tuple[float, Waits]:
    with get_engine(url).begin() as conn:
        conn.execute(text("DROP TABLE IF EXISTS bare_predictions"))
        conn.execute(text(BARE_TABLE))
        for index in INDEXES if indexed else ():
            conn.execute(text(index))
    jobs = [[(0, seq) for seq in range(w, batches, writers)] for w in range(writers)]
    return measure(url, _copy_bare, jobs, size)


def sqlite_rate(url: str, clf: Any, batches: int, size: int) -> tuple[float, Waits]:
    """One writer's rows/s into a fresh SQLite file (and its CPU a batch)."""
    ids = new_runs(url, store_model(url, clf), 1, batches, size)
    return measure(url, _write, [[(ids[0], seq) for seq in range(batches)]], size)


#: One writer of an earlier tree (its own schema and ``store_batch_results``, as at commit
#: 18189bd), timed in its own process on the rows of a JSON file: argv url, file.
_EARLIER_WRITER = """
import json, resource, sys, time
from bench.common import store_model, train_classifier
from db.queries import create_run, finish_submission, record_batch, store_batch_results
from db.session import get_engine

url, rows_file = sys.argv[1:3]
batches = json.loads(open(rows_file).read())
model_id = store_model(url, train_classifier())
engine = get_engine(url)
with engine.begin() as conn:
    run_id, _ = create_run(conn, model_id, "/bench", "celery")
    for seq, rows in enumerate(batches):
        record_batch(conn, run_id, seq, [r["path"] for r in rows], 0)
finish_submission(engine, run_id, sum(map(len, batches)), 0)
def cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime

start, cpu_start = time.time(), cpu()
for seq, rows in enumerate(batches):
    store_batch_results(engine, run_id, seq, rows)
print(sum(map(len, batches)) / (time.time() - start), (cpu() - cpu_start) / len(batches) * 1000)
"""


def earlier_tree(commit: str, into: Path) -> Path:
    """The project's files at ``commit`` (``git archive``), to run its write path."""
    into.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def earlier_sqlite_rate(tree: Path, rows_file: Path, url: str) -> tuple[float, float]:
    """One writer's rows/s into a fresh SQLite file with ``tree``'s write path, and its CPU
    milliseconds a batch."""
    out = subprocess.run(
        [sys.executable, "-c", _EARLIER_WRITER, url, str(rows_file)], cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree)}, capture_output=True, text=True,
    )
    if out.returncode:
        raise RuntimeError(f"the earlier tree's writer failed:\n{out.stderr[-2000:]}")
    rate, cpu = out.stdout.split()[-2:]
    return float(rate), float(cpu)


def _line(name: str, rounds: list[tuple[float, Waits, float | None]]) -> str:
    """One line of medians over the rounds (the rounds in brackets)."""
    def mid(values: list[float]) -> float:
        return sorted(values)[len(values) // 2]

    rates = [r for r, _, _ in rounds]
    out = f"{name}: {mid(rates):,.0f} rows/s ({', '.join(f'{r:,.0f}' for r in rates)})"
    ratios = [x for _, _, x in rounds if x is not None]
    if ratios:
        out += f"; {mid(ratios):.2f} of bare ({', '.join(f'{x:.2f}' for x in ratios)})"
    locks, extends = [w[0] for _, w, _ in rounds], [w[1] for _, w, _ in rounds]
    client, server = [w[2] for _, w, _ in rounds], [w[3] for _, w, _ in rounds]
    if max(locks + extends) or name.startswith(("bare", "COPY", "1", "4")):
        out += (f"; waiting for a row/transaction lock in {mid(locks):.1%} of samples, "
                f"to extend the table in {mid(extends):.1%}")
    if max(server):
        out += f"; CPU a batch: writer {mid(client):.1f} ms, server {mid(server):.1f} ms"
    elif max(client):
        out += f"; CPU a batch: {mid(client):.1f} ms"
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--writers", type=int, nargs="+", default=[1, 4])
    p.add_argument("--batches", type=int, default=24)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--sqlite", action="store_true", help="also one writer on a SQLite file")
    p.add_argument("--sqlite-against", metavar="COMMIT",
                   help="with --sqlite, also one writer of COMMIT's tree (its own write path "
                   "and schema) on the same rows, in each round")
    p.add_argument("--postgres-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    args = p.parse_args(argv)
    clf = train_classifier()
    found: dict[str, list[Any]] = {}
    #: per round, SQLite's rate over the earlier tree's, and the earlier tree's CPU a batch
    #: over its own
    against: list[tuple[float, float]] = []
    with postgres_database(args.postgres_url) as url, tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_id = store_model(url, clf)
        if args.sqlite and args.sqlite_against:
            tree = earlier_tree(args.sqlite_against, work / "earlier")
            rows_file = work / "rows.json"
            rows_file.write_text(json.dumps(
                [batch_rows(seq, args.batch_size) for seq in range(args.batches)]))
        for r in range(args.repeat):
            for w in args.writers:
                shapes = [(f"{plural(w, 'writer')} of one run", 1)]
                if w > 1:
                    shapes.append((f"{w} writers of {w} runs", w))
                base, waits = bare(url, w, args.batches, args.batch_size)
                writers = plural(w, "writer")
                found.setdefault(f"bare COPY, {writers}", []).append((base, waits, None))
                floor, waits = bare(url, w, args.batches, args.batch_size, indexed=True)
                found.setdefault(f"COPY with predictions' indexes, {writers}", []).append(
                    (floor, waits, floor / base))
                for name, n_runs in shapes:
                    rate, waits = product(url, model_id, w, n_runs, args.batches,
                                          args.batch_size)
                    found.setdefault(name, []).append((rate, waits, rate / base))
            if args.sqlite:
                lite, waits = sqlite_rate(sqlite_url(work / f"now-{r}.db"), clf, args.batches,
                                          args.batch_size)
                found.setdefault("SQLite, 1 writer", []).append((lite, waits, None))
            if args.sqlite and args.sqlite_against:
                earlier, cpu = earlier_sqlite_rate(tree, rows_file,
                                                   sqlite_url(work / f"then-{r}.db"))
                found.setdefault(f"SQLite, 1 writer, {args.sqlite_against}'s write path",
                                 []).append((earlier, (0, 0, cpu, 0), None))
                against.append((lite / earlier, cpu / waits[2]))
        dispose_engines()
    print(f"load average {', '.join(f'{x:.1f}' for x in os.getloadavg())} at the end")
    for name, rounds in found.items():
        print(_line(name, rounds))
    for i, what in enumerate(("rows/s", "CPU a batch, then over now")):
        if against:
            ratios = [a[i] for a in against]
            print(f"SQLite, 1 writer, now against {args.sqlite_against}'s, {what}: "
                  f"{sorted(ratios)[len(ratios) // 2]:.2f} "
                  f"({', '.join(f'{x:.2f}' for x in ratios)})")


if __name__ == "__main__":
    main()
