"""The baselines the system is measured against: the plain script, naive Celery, and the
decode-and-score limit of one process (with its split into decoding and scoring)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from bench.common import ROOT
from core.classifier import Classifier
from core.scoring import Scores, score_stack
from core.wire import queue_lists

Decoder = Callable[[Sequence[bytes], int, int], tuple[np.ndarray, list[int], dict[int, str]]]
Scorer = Callable[[Classifier, np.ndarray, torch.device], Scores]


def run_plain_script_timed(root: Path, model_npz: Path, out: Path) -> tuple[int, float, float]:
    """``bench/plain_script.py`` in a fresh process, the model read from ``model_npz``
    (``bench.common.export_model``); returns (images, seconds from its first file listed,
    seconds of the whole process)."""
    script = ROOT / "bench" / "plain_script.py"
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(script), str(root), str(model_npz), str(out)],
        capture_output=True, text=True, check=False, timeout=3600,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"plain script failed:\n{proc.stderr[-3000:]}")
    wall = time.perf_counter() - started
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return int(result["images"]), float(result["seconds"]), wall


def run_naive_celery(
    paths: Sequence[Path],
    db_url: str,
    model_id: int,
    work_dir: Path,
    broker_url: str,
    device: str,
    processes: int = 2,
) -> tuple[int, float]:
    """Naive Celery (bench/naive_celery.py) with ``processes`` pool processes: one task per
    image sent from here, timed from the first send until every row is in; (images, seconds)."""
    results = work_dir / f"naive-{uuid.uuid4().hex[:8]}.db"
    with sqlite3.connect(results) as db:  # SQLite's defaults, as a user leaves them
        from bench.naive_celery import RESULTS_TABLE

        db.execute(RESULTS_TABLE)
    queue = f"bench-naive-{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ, "PYTHONPATH": str(ROOT), "NAIVE_BROKER_URL": broker_url,
        "NAIVE_QUEUE": queue, "NAIVE_MODEL_DB": db_url, "NAIVE_MODEL_ID": str(model_id),
        "NAIVE_RESULTS": str(results), "NAIVE_DEVICE": device,
    }
    log = work_dir / f"{queue}.log"
    with open(log, "wb") as out:
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "bench.naive_celery", "worker",
             "--concurrency", str(processes), "--loglevel", "INFO", "-n", f"{queue}@%h"],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        _wait_ready(worker, log)
        os.environ.update({k: env[k] for k in ("NAIVE_BROKER_URL", "NAIVE_QUEUE")})
        from bench import naive_celery

        naive_celery.app.conf.broker_url = broker_url
        naive_celery.app.conf.task_default_queue = queue
        start = time.perf_counter()
        for p in paths:
            naive_celery.score_image.apply_async((str(p),), queue=queue)
        done = 0
        while done < len(paths):
            time.sleep(0.02)
            with sqlite3.connect(results, timeout=60) as db:
                done = db.execute("SELECT COUNT(*) FROM results").fetchone()[0]
            if worker.poll() is not None:
                raise RuntimeError(f"naive worker died:\n{log.read_text()[-3000:]}")
        return len(paths), time.perf_counter() - start
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
        import redis

        redis.Redis.from_url(broker_url).delete(*queue_lists(queue))


def _wait_ready(proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while "ready." not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"worker did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)


def decode_score_rate(
    blobs: Sequence[bytes], classifier: Classifier, device: str, decoder: Decoder,
    batch: int = 512,
) -> float:
    """Images per second of :func:`decode_score_split`."""
    return decode_score_split(blobs, classifier, device, decoder, batch)["rate"]


def decode_score_split(
    blobs: Sequence[bytes], classifier: Classifier, device: str, decoder: Decoder,
    batch: int = 512, scorer: Scorer = score_stack,
) -> dict[str, float]:
    """One process (one torch thread on the CPU, as a worker process) decoding encoded images
    already in memory and scoring them as a worker does: no file reads, no messages, no
    database. Images per second (``rate``), and the microseconds an image spent decoding
    (``decode_us``) and scoring (``score_us``)."""
    threads = torch.get_num_threads()
    dev = torch.device(device)
    classifier = classifier.to(dev)  # as a worker keeps its model on its device
    if dev.type == "cpu":
        torch.set_num_threads(1)
    decoding = scoring = 0.0
    try:
        for i in range(0, len(blobs), batch):
            start = time.perf_counter()
            stack, ok, _ = decoder(blobs[i : i + batch], *classifier.ideals.shape[1:])
            decoded = time.perf_counter()
            if ok:
                scorer(classifier, stack, dev)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            decoding += decoded - start
            scoring += time.perf_counter() - decoded
    finally:
        torch.set_num_threads(threads)
    n = len(blobs)
    return {"rate": n / (decoding + scoring), "decode_us": decoding / n * 1e6,
            "score_us": scoring / n * 1e6}
