"""The system end to end: real ``worker`` processes, Redis, a results database, and
``producer submit --wait`` as a subprocess, timed from the start of its walk of the
directory until the run is ``done`` (``runs.finished_at``, written in the transaction that
stores the last rows)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import text

from bench.common import ROOT, as_utc, children, peak_rss_mib
from core.wire import queue_lists
from db.session import dispose_engines, get_engine

_SUCCEEDED = re.compile(r"succeeded in ([0-9.]+)s")


def service_env(broker_url: str, queue: str, db_url: str) -> dict[str, str]:
    return {
        "DIGITSCORE_BROKER_URL": broker_url,
        "DIGITSCORE_QUEUE": queue,
        "DIGITSCORE_DATABASE_URL": db_url,
        "PYTHONPATH": str(ROOT),
        "PYTHONUNBUFFERED": "1",
    }


@dataclass
class WorkerSet:
    """``n`` separate ``worker --device DEVICE`` launchers, each one Celery worker with
    ``concurrency`` pool processes (``None``: the worker's default, one per core), as an
    operator starts them on a host."""

    n: int
    device: str
    env: dict[str, str]
    log_dir: Path
    concurrency: int | None = 1
    procs: list[subprocess.Popen] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    def start(self, ready_timeout: float = 120) -> WorkerSet:
        tag = uuid.uuid4().hex[:6]
        for i in range(self.n):
            log = self.log_dir / f"worker-{tag}-{i}.log"
            pool = [] if self.concurrency is None else ["--concurrency", str(self.concurrency)]
            argv = [sys.executable, "-c", "from worker.cli import main; main()",
                    "--device", self.device, *pool, "--", "--hostname", f"bench{i}-{tag}@%h"]
            with open(log, "wb") as out:
                self.procs.append(subprocess.Popen(
                    argv, env={**os.environ, **self.env}, stdout=out, stderr=subprocess.STDOUT,
                    start_new_session=True,
                ))
            self.logs.append(log)
        deadline = time.monotonic() + ready_timeout
        for proc, log in zip(self.procs, self.logs, strict=True):
            while "ready." not in log.read_text(errors="replace"):
                if proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    tail = log.read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"worker did not become ready:\n{tail}")
                time.sleep(0.1)
        return self

    def task_seconds(self) -> list[float]:
        """How long each batch took in its pool process so far ("succeeded in Xs" in the
        Celery logs): the time a worker process was busy, without waiting for work."""
        return [float(x) for log in self.logs
                for x in _SUCCEEDED.findall(log.read_text(errors="replace"))]

    def peak_memory(self) -> dict[str, float]:
        """Peak RSS (MiB) of the largest Celery main process and of the largest pool process
        (the one that decodes, scores and writes), over the workers."""
        mains: list[float] = []
        pools: list[float] = []
        for proc in self.procs:
            for main in children(proc.pid):
                mains.append(peak_rss_mib(main) or 0.0)
                pools.extend(peak_rss_mib(p) or 0.0 for p in children(main))
        return {"worker_main_mib": max(mains, default=0.0),
                "worker_pool_mib": max(pools, default=0.0)}

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def __enter__(self) -> WorkerSet:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()


@dataclass(frozen=True)
class SubmitResult:
    run_id: int
    n_images: int
    seconds: float  # the walk's start (first file listed) -> run done
    producer_peak_mib: float | None
    wall_seconds: float | None = None  # the producer process, start to exit, as a shell sees

    @property
    def rate(self) -> float:
        return self.n_images / self.seconds


def submit_and_wait(
    directory: Path,
    env: dict[str, str],
    work_dir: Path,
    extra: Sequence[str] = (),
    timeout: float = 1800,
) -> SubmitResult:
    """Run ``producer submit DIRECTORY --wait [EXTRA...]`` (the console script's code) with
    ``env``."""
    stats_file = work_dir / f"producer-{uuid.uuid4().hex[:8]}.json"
    argv = [sys.executable, "-m", "bench.run_producer", "submit", str(directory), "--wait",
            *extra]
    started = time.perf_counter()
    proc = subprocess.run(
        argv, env={**os.environ, **env, "BENCH_PRODUCER_STATS": str(stats_file)},
        capture_output=True, text=True, timeout=timeout, cwd=work_dir,
    )
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"producer submit failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    stats = json.loads(stats_file.read_text())
    stats_file.unlink()
    engine = get_engine(env["DIGITSCORE_DATABASE_URL"])
    with engine.connect() as conn:
        run = conn.execute(text(
            "SELECT id, status, n_images, n_scored, n_failed, finished_at FROM runs "
            "ORDER BY id DESC LIMIT 1"
        )).mappings().one()
    dispose_engines()
    if run["status"] != "done" or run["n_scored"] != run["n_images"]:
        raise RuntimeError(f"run {run['id']} ended {dict(run)}")
    seconds = as_utc(run["finished_at"]).timestamp() - stats["walk_start"]
    return SubmitResult(int(run["id"]), int(run["n_images"]), seconds, stats["peak_rss_mib"],
                        wall)


def submit_then_release(
    directory: Path,
    env: dict[str, str],
    work_dir: Path,
    broker_url: str,
    extra: Sequence[str] = (),
    timeout: float = 1800,
) -> SubmitResult:
    """A worker's own rate with its queue full: ``producer submit DIRECTORY`` (no ``--wait``)
    enqueues every batch on a holding queue that no worker reads; then the holding list is
    renamed to the workers' queue in one Redis command (a worker blocked in BRPOP on it wakes
    at once) and the clock runs from that rename until the run is ``done``. The producer is
    then not competing for the cores, nor limiting how fast batches arrive."""
    import redis

    queue = env["DIGITSCORE_QUEUE"]
    hold = f"{queue}.hold"
    argv = [sys.executable, "-m", "bench.run_producer", "submit", str(directory), *extra]
    proc = subprocess.run(
        argv, env={**os.environ, **env, "DIGITSCORE_QUEUE": hold},
        capture_output=True, text=True, timeout=timeout, cwd=work_dir,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"producer submit failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    client = redis.Redis.from_url(broker_url)
    engine = get_engine(env["DIGITSCORE_DATABASE_URL"])
    latest = text("SELECT id, status, n_images, n_scored, n_failed, finished_at FROM runs "
                  "ORDER BY id DESC LIMIT 1")
    started = time.time()
    pipe = client.pipeline(transaction=True)  # each priority list at once
    for held, target in zip(queue_lists(hold), queue_lists(queue), strict=True):
        if client.exists(held):
            pipe.rename(held, target)
    pipe.execute()
    deadline = time.monotonic() + timeout
    while True:
        with engine.connect() as conn:
            run = conn.execute(latest).mappings().one()
        if run["status"] == "done" or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    dispose_engines()
    client.delete(*queue_lists(hold))
    if run["status"] != "done" or run["n_scored"] != run["n_images"]:
        raise RuntimeError(f"run {run['id']} ended {dict(run)}")
    seconds = as_utc(run["finished_at"]).timestamp() - started
    return SubmitResult(int(run["id"]), int(run["n_images"]), seconds, None)


def delete_queue(broker_url: str, queue: str) -> None:
    """The queue, its priority lists and any payload left behind (also of ``queue.hold``)."""
    import redis

    client = redis.Redis.from_url(broker_url)
    client.delete(*queue_lists(queue))
    for pattern in (f"digitscore:payload:{queue}:*", f"digitscore:payload:{queue}.hold:*"):
        for key in client.scan_iter(pattern):
            client.delete(key)
