"""What ``producer report``, ``report --json`` and ``report --html`` cost on big runs.

    python -m bench.reports [--sizes 100000,1000000] [--repeat 3] [--data-dir DIR]

A seed run is scored for real: 10,000 digit PNGs (bench/dataset.py) submitted in this process,
plus a poison batch of 10 failed rows. A run of N rows is the seed's rows copied N / 10,000
times with ``INSERT ... SELECT`` under new paths (``c<k>/<path>``; the run's source directory
holds ``c<k>`` links to the seed's, so the HTML page finds every picture), its batches
likewise, and its kept counts the seed's times the copies (checked against the views).
Each command then runs as users run it, a fresh ``producer`` process, ``--repeat`` rounds of
every size in turn, on SQLite and on PostgreSQL; ``producer status`` is the floor (the same
process start, no report). Beside them, in this process: the reads of the report as they
were, aggregating the run's rows through the views, and as they are, from the kept counts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: the project root is the parent folder
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import Engine, text  # noqa: E402

from bench import common, dataset  # noqa: E402
from core import defaults  # noqa: E402
from core.columns import (
    PREDICTORS,  # noqa: E402
    batch_columns,  # noqa: E402
)
from db import batch_life, mistakes, queries, reads, views  # noqa: E402
from db.batch_life import poison_rows  # noqa: E402
from db.session import dispose_engines, get_engine  # noqa: E402
from producer.report import build_report  # noqa: E402
from producer.submit import EmbeddedSender, submit_directory  # noqa: E402

SEED_IMAGES = 10_000
SEED_FAILED = 10
COMMANDS = {
    "status": ["status"],
    "report": ["report"],
    "report --json": ["report", "--json"],
    "report --html": ["report", "--html", "{html}"],
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def seed_run(engine: Engine, clf: Any, model_id: int, root: Path) -> int:
    """The seed: every image of ``root`` scored and stored, then a poison batch."""
    sub = submit_directory(engine, root, model_id, EmbeddedSender(engine, clf))
    paths = [f"{label}/poison-{i}.png" for i, label in enumerate("0123456789")][:SEED_FAILED]
    with engine.begin() as conn:
        seq = queries.next_batch_seq(conn, sub.run_id)
        batch_life.record_batch(conn, sub.run_id, seq, paths, 0)
        # the run is sent again (as `resume --retry-failed` does): its row settles anew below
        conn.execute(text(
            "UPDATE runs SET status = 'running', n_images = n_images + :n WHERE id = :r"
        ), {"n": len(paths), "r": sub.run_id})
    batch_life.store_batch(
        engine, sub.run_id, seq, batch_columns(poison_rows(paths, clf.classes, 3)), "failed"
    )
    return sub.run_id


_BATCH_COLUMNS = (
    "paths, n_images, n_bytes, status, deliveries, enqueued_at, finished_at, n_scored, "
    "n_failed, n_labelled, n_correct_l1, n_correct_l2, n_correct_sgd, n_agree, n_agree_l1_l2, "
    "n_agree_l1_sgd, n_agree_l2_sgd, prob_sgd_bins"
)
_COPIES = "WITH RECURSIVE k(n) AS (SELECT 0 UNION ALL SELECT n + 1 FROM k WHERE n < :last) "
_ROW_COLUMNS = (
    "label, pred_l1, pred_l2, pred_sgd, dist_l1, dist_l2, prob_sgd, error, scored_at"
)


def copy_run(engine: Engine, seed: int, copies: int, source_dir: Path) -> int:
    """A done run of ``copies`` copies of the seed's rows, batches and their counts."""
    k = {"seed": seed, "k": copies, "last": copies - 1}
    with engine.begin() as conn:
        n_seq = queries.next_batch_seq(conn, seed)
        run_id = conn.execute(text(
            "INSERT INTO runs (model_id, source_dir, backend, status, n_images, n_skipped, "
            "n_scored, n_failed, accuracy_l1, accuracy_l2, accuracy_sgd, created_at, "
            "submitted_at, started_at, finished_at, n_labelled, n_correct_l1, n_correct_l2, "
            "n_correct_sgd, token) SELECT model_id, :src, backend, 'done', n_images * :k, 0, "
            "n_scored * :k, n_failed * :k, accuracy_l1, accuracy_l2, accuracy_sgd, "
            "created_at, submitted_at, started_at, finished_at, n_labelled * :k, "
            "n_correct_l1 * :k, n_correct_l2 * :k, n_correct_sgd * :k, :token "
            "FROM runs WHERE id = :seed RETURNING id"
        ), {**k, "src": str(source_dir), "token": uuid.uuid4().hex}).scalar_one()
        k["run"] = run_id
        conn.execute(text(
            _COPIES + f"INSERT INTO batches (run_id, seq, {_BATCH_COLUMNS}) SELECT :run, "
            f"b.seq + k.n * :n_seq, {', '.join('b.' + c for c in _BATCH_COLUMNS.split(', '))} "
            "FROM batches b, k WHERE b.run_id = :seed"
        ), {**k, "n_seq": n_seq})
        conn.execute(text(
            _COPIES + f"INSERT INTO predictions (run_id, batch_seq, path, {_ROW_COLUMNS}) "
            f"SELECT :run, p.batch_seq + k.n * :n_seq, 'c' || k.n || '/' || p.path, "
            f"{', '.join('p.' + c for c in _ROW_COLUMNS.split(', '))} "
            "FROM predictions p, k WHERE p.run_id = :seed ORDER BY k.n, p.path"
        ), {**k, "n_seq": n_seq})
        for table, key in (("batch_counts", "predictor, label, predicted"),
                           ("batch_failures", "error")):
            conn.execute(text(
                _COPIES + f"INSERT INTO {table} (run_id, batch_seq, {key}, n) SELECT :run, "
                f"batch_seq + k.n * :n_seq, {key}, {table}.n FROM {table}, k WHERE run_id = :seed"
            ), {**k, "n_seq": n_seq})
        kept = defaults.MISTAKES_KEPT
        for r in conn.execute(mistakes.unsure_scan_query(run_id, kept)).mappings():
            conn.execute(text(
                "INSERT INTO run_unsure (run_id, path, prob_sgd) VALUES (:run, :path, :p)"
            ), {"run": run_id, "path": r["path"], "p": r["prob_sgd"]})
        for p in PREDICTORS:  # the kept mistakes: the first of the copies, by key and path
            rows = conn.execute(mistakes.scan_query(run_id, p, kept)).mappings()
            for r in rows:
                conn.execute(text(
                    "INSERT INTO run_mistakes (run_id, predictor, path, rank_key) "
                    "VALUES (:run, :p, :path, :key)"
                ), {"run": run_id, "p": p, "path": r["path"],
                    "key": -r["prob_sgd"] if p == "sgd" else r[f"dist_{p}"]})
        if conn.dialect.name == "postgresql":
            conn.execute(text("ANALYZE"))
    return int(run_id)


def check_counts(engine: Engine, run_id: int) -> None:
    """The copied counts are those of the copied rows (the views aggregate them)."""
    with engine.connect() as conn:
        assert reads.confusion_counts(conn, run_id) == views.confusion(conn, run_id)
        got = {r["error"]: r["n"] for r in reads.failure_reasons(conn, run_id)}
        rows = conn.execute(text(
            "SELECT error, COUNT(*) FROM predictions WHERE run_id = :r AND error IS NOT NULL "
            "GROUP BY error"), {"r": run_id}).all()
        assert got == {e: int(n) for e, n in rows}


def time_reads(engine: Engine, run_id: int) -> dict[str, float]:
    """Seconds, in this process, of the report's reads through the views (aggregating the
    run's rows, and sorting its mistakes) and of ``build_report`` with the kept mistakes."""
    out = {}
    with engine.connect() as conn:
        t = time.perf_counter()
        views.class_accuracy(conn, run_id)
        views.confusion(conn, run_id)
        views.run_accuracy(conn, run_id)
        conn.execute(text(
            "SELECT error, COUNT(*) FROM predictions WHERE run_id = :r AND error IS NOT NULL "
            "GROUP BY error"), {"r": run_id}).all()
        for p in PREDICTORS:
            conn.execute(mistakes.scan_query(run_id, p, 24)).all()
        out["reads_over_the_rows"] = time.perf_counter() - t
        t = time.perf_counter()
        build_report(conn, run_id)
        for p in PREDICTORS:
            mistakes.confident_mistakes(conn, run_id, p, 24)
        out["reads_of_the_counts"] = time.perf_counter() - t
    return out


def time_command(url: str, run_id: int, args: list[str], work: Path) -> float:
    html = work / f"report-{run_id}.html"
    argv = [sys.executable, "-c", "from producer.cli import main; main()",
            *[a.format(html=html) for a in args], str(run_id), "--database-url", url]
    env = {**os.environ, "PYTHONPATH": str(common.ROOT)}
    t = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=work)
    seconds = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return seconds


def measure(url: str, args: argparse.Namespace, clf: Any, seed_root: Path, work: Path
            ) -> dict[str, dict[str, Any]]:
    model_id = common.store_model(url, clf)
    engine = get_engine(url)
    t = time.perf_counter()
    seed = seed_run(engine, clf, model_id, seed_root)
    log(f"  seed run {seed}: {SEED_IMAGES + SEED_FAILED:,} rows in {time.perf_counter() - t:.1f} s")
    out: dict[str, dict[str, Any]] = {}
    runs: dict[str, int] = {}
    for size in args.sizes:
        copies = size // SEED_IMAGES
        source = work / f"source-{copies}"
        source.mkdir(exist_ok=True)
        for i in range(copies):
            link = source / f"c{i}"
            if not link.exists():
                link.symlink_to(seed_root, target_is_directory=True)
        t = time.perf_counter()
        run_id = copy_run(engine, seed, copies, source)
        built = time.perf_counter() - t
        check_counts(engine, run_id)
        with engine.connect() as conn:
            n_rows = queries.progress(conn, run_id).done
        log(f"  run {run_id}: {n_rows:,} rows, built in {built:.1f} s")
        runs[str(size)] = run_id
        out[str(size)] = {"rows": n_rows, "build_seconds": built}
    dispose_engines()
    # round by round, each size in turn, so that a change of the machine's load falls on
    # every size alike
    for _ in range(args.repeat):
        for size, run_id in runs.items():
            figures = out[size]
            for name, command in COMMANDS.items():
                figures.setdefault(name, []).append(time_command(url, run_id, command, work))
            for name, seconds in time_reads(get_engine(url), run_id).items():
                figures.setdefault(name, []).append(seconds)
            dispose_engines()
    for figures in out.values():
        for name in [*COMMANDS, "reads_over_the_rows", "reads_of_the_counts"]:
            times = figures[name]
            log(f"  {figures['rows']:>9,} rows  {name:20s} median "
                f"{statistics.median(times):6.2f} s  (all: {', '.join(f'{x:.2f}' for x in times)})")
    return out


def format_results(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    """One line per database and command: median (fastest) seconds at each size, and the
    ratio of the medians at the largest and the smallest size."""
    sizes = [f["rows"] for f in next(iter(results.values())).values()]
    lines = ["| database | command | " + " | ".join(f"{n:,} rows" for n in sizes)
             + " | ratio |", "|---|---|" + "---|" * (len(sizes) + 1)]
    for db, by_size in results.items():
        for name in [*COMMANDS, "reads_over_the_rows", "reads_of_the_counts"]:
            runs = [f[name] for f in by_size.values()]
            medians = [statistics.median(r) for r in runs]
            cells = [f"{m:.2f} ({min(r):.2f})" for m, r in zip(medians, runs, strict=True)]
            ratio = medians[-1] / medians[0] if medians[0] else float("nan")
            lines.append(f"| {db} | {name} | " + " | ".join(cells) + f" | {ratio:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.reports", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="100000,1000000", help="rows of the runs measured")
    p.add_argument("--repeat", type=int, default=3, help="runs of each command (median)")
    common.add_data_options(p)
    p.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    args = p.parse_args(argv)
    args.sizes = [int(s) for s in args.sizes.split(",")]
    seed_root = dataset.image_set(args.data_dir, SEED_IMAGES, SEED_IMAGES)
    clf = common.train_classifier()
    results: dict[str, Any] = {}
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="digitscore-rep-")))
        urls = {"SQLite": common.sqlite_url(work / "reports.db")}
        if common.postgres_reachable(args.postgres_url):
            urls["PostgreSQL"] = stack.enter_context(common.postgres_database(args.postgres_url))
        else:
            log(f"PostgreSQL at {args.postgres_url} not reachable: skipped")
        for name, url in urls.items():
            log(f"{name}")
            results[name] = measure(url, args, clf, seed_root, work)
            dispose_engines()
    print(format_results(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
