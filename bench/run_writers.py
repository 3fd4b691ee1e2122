"""Rows per second stored into one run on PostgreSQL by 1, 2 and 4 writer processes at once.

    python -m bench.run_writers [--writers 1 2 4] [--batches 24] [--batch-size 4096]

Each writer is a process calling ``db.batch_life.store_batch`` on batches of ready-made
rows (no decoding, no scoring), so the figure is how fast one run's results can be written.
How much the writers wait on each other is shown apart from it, as it does not depend on the
machine's cores: the share of PostgreSQL's samples of the writers' sessions (every 10 ms, from
``pg_stat_activity``) that found one waiting for a lock. Needs the PostgreSQL of
``--postgres-url``; a database of its own is created and dropped.
"""

from __future__ import annotations

import argparse
import multiprocessing
import threading
import time
from typing import Any

from sqlalchemy import text

from bench.common import postgres_database, store_model, train_classifier
from core.rows import PredictionRow
from db.batch_life import record_batch, store_batch
from db.queries import create_run
from db.session import dispose_engines, get_engine


def batch_rows(seq: int, size: int) -> list[PredictionRow]:
    rows: list[PredictionRow] = []
    for i in range(size):
        label = str(i % 10)
        rows.append({
            "path": f"d{seq}/img{i:05d}.png", "label": label, "pred_l1": label,
            "pred_l2": label, "pred_sgd": str((i + 1) % 10), "dist_l1": 0.1, "dist_l2": 0.2,
            "prob_sgd": 0.9, "error": None,
        })  # fmt: skip
    return rows


def _write(url: str, run_id: int, seqs: list[int], size: int, ready: Any) -> None:
    prepared = [(seq, batch_rows(seq, size)) for seq in seqs]
    engine = get_engine(url)
    with engine.connect():
        pass  # connected, schema checked: only the writes are timed
    ready.wait()  # every writer begins at once
    for seq, rows in prepared:
        store_batch(engine, run_id, seq, rows)
    dispose_engines()


_SAMPLE = text(
    "SELECT COUNT(*) FILTER (WHERE wait_event_type = 'Lock'), COUNT(*) FROM pg_stat_activity "
    "WHERE datname = current_database() AND state = 'active' AND pid <> pg_backend_pid()"
)


def _sample_lock_waits(url: str, stop: threading.Event, counts: list[int]) -> None:
    """Every 10 ms until ``stop``: add to ``counts`` the writers' sessions waiting for a lock
    and the writers' sessions at work."""
    with get_engine(url).connect() as conn:
        while not stop.is_set():
            waiting, active = conn.execute(_SAMPLE).one()
            conn.rollback()
            counts[0] += waiting
            counts[1] += active
            time.sleep(0.01)


def measure(
    url: str, model_id: int, writers: int, batches: int, size: int
) -> tuple[float, float]:
    """Rows per second into one fresh run with ``writers`` processes sharing ``batches``, and
    the share of samples of working writers that found one waiting for a lock."""
    engine = get_engine(url)
    with engine.begin() as conn:
        run_id, _token = create_run(conn, model_id, "/bench", "celery")
        for seq in range(batches):
            record_batch(conn, run_id, seq, [f"d{seq}/img{i:05d}.png" for i in range(size)], 0)
    dispose_engines()
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Barrier(writers + 1)
    procs = [
        ctx.Process(target=_write, args=(url, run_id, list(range(w, batches, writers)), size,
                                         ready))
        for w in range(writers)
    ]
    for p in procs:
        p.start()
    stop, counts = threading.Event(), [0, 0]
    sampler = threading.Thread(target=_sample_lock_waits, args=(url, stop, counts))
    sampler.start()
    ready.wait()  # every writer has its rows and its connection
    start = time.time()
    for p in procs:
        p.join()
        if p.exitcode:
            raise RuntimeError(f"a writer exited with {p.exitcode}")
    elapsed = time.time() - start
    stop.set()
    sampler.join()
    with get_engine(url).connect() as conn:
        n = conn.execute(text("SELECT n_scored FROM runs WHERE id = :r"), {"r": run_id}).scalar()
    assert n == batches * size, (n, batches * size)
    return batches * size / elapsed, counts[0] / max(1, counts[1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--writers", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--batches", type=int, default=24)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--postgres-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    args = p.parse_args(argv)
    with postgres_database(args.postgres_url) as url:
        model_id = store_model(url, train_classifier())
        for writers in args.writers:
            found = [
                measure(url, model_id, writers, args.batches, args.batch_size)
                for _ in range(args.repeat)
            ]
            rates = sorted(rate for rate, _ in found)
            waits = sorted(wait for _, wait in found)
            print(f"{writers} writer(s): median {rates[len(rates) // 2]:,.0f} rows/s "
                  f"(rounds {', '.join(f'{r:,.0f}' for r in rates)}); waiting for a lock in "
                  f"{waits[len(waits) // 2]:.0%} of samples (rounds "
                  f"{', '.join(f'{w:.0%}' for w in waits)})")


if __name__ == "__main__":
    main()
