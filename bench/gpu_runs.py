"""The two measuring steps of bench/gpu_check.sh, each one line of figures.

    python -m bench.gpu_runs split --device cuda:0 [--images N]
    python -m bench.gpu_runs worker --device cuda:0 --images N --broker-url URL --work-dir DIR

``split``: what one worker process spends on an image, decoding (libspng, on the CPU) and
scoring (on the device), microseconds an image, timed apart after a warm-up batch (the first
batch on a GPU pays for CUDA's lazy start and the kernels' first load), with one torch thread
as in a pool process.

``worker``: one ``worker --device DEVICE`` with its default pool (every core shared by the
devices), a SQLite database, and a full queue: ``producer submit --send paths --wait`` of N
images; images/s from the walk's first file to the run's end.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import uuid
from pathlib import Path

import torch

from bench import common, dataset, runners, system
from core import defaults, fast_decode


def split(device: str, n_images: int, batch: int = defaults.BATCH_SIZE) -> dict[str, float]:
    """Microseconds an image to decode and to score, in batches of ``batch``, one process,
    after a warm-up batch."""
    torch.set_num_threads(1)
    clf = common.train_classifier()
    blobs, _labels = dataset.encoded_digits()
    blobs = [blobs[i % len(blobs)] for i in range(n_images)]
    runners.decode_score_split(blobs[:batch], clf, device, fast_decode.decode_images, batch)
    found = runners.decode_score_split(blobs, clf, device, fast_decode.decode_images, batch)
    return {"images": n_images, **found}


def worker_rate(device: str, n_images: int, broker_url: str, work: Path) -> dict[str, float]:
    """Images/s of one worker on ``device`` with its whole pool and a full queue."""
    work.mkdir(parents=True, exist_ok=True)
    db_url = common.sqlite_url(work / f"digitscore-{device.replace(':', '')}.db")
    common.store_model(db_url, common.train_classifier())
    root = dataset.image_set(work / "images", n_images, min(n_images, 20_000))
    env = system.service_env(broker_url, f"digitscore-gpu-check-{uuid.uuid4().hex[:8]}", db_url)
    workers = system.WorkerSet(1, device, env, work, concurrency=None).start(ready_timeout=120)
    log = workers.logs[0]
    try:
        result = system.submit_and_wait(root, env, work, ("--send", "paths"), timeout=600)
        pool = log.read_text(errors="replace").count(" scores on ")
        memory = gpu_memory_mib() if device.startswith("cuda") else []
    finally:
        workers.stop()
    return {"images": result.n_images, "seconds": result.seconds, "rate": result.rate,
            "pool": pool, "gpu_mib": max(memory, default=0)}


def gpu_memory_mib() -> list[int]:
    """The GPU memory (MiB) of each process on a GPU now, as ``nvidia-smi`` reports it."""
    query = ["nvidia-smi", "--query-compute-apps=used_memory", "--format=csv,noheader,nounits"]
    try:
        out = subprocess.run(query, capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [int(x) for x in out.split() if x.isdigit()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_runs", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("split", "worker"))
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--images", type=int, default=50_000)
    p.add_argument("--broker-url", help="worker: the broker (redis://...)")
    p.add_argument("--work-dir", type=Path, help="worker: its database, images and logs")
    args = p.parse_args(argv)
    if args.what == "split":
        found = split(args.device, args.images)
        print(f"{args.device}: decode {found['decode_us']:.2f} us an image, score "
              f"{found['score_us']:.2f} us an image, one process, {found['images']:,} images "
              f"after a warm-up")
        return 0
    if not args.broker_url or not args.work_dir:
        p.error("worker needs --broker-url and --work-dir")
    found = worker_rate(args.device, args.images, args.broker_url, args.work_dir)
    memory = f", GPU memory up to {found['gpu_mib']} MiB a process" if found["gpu_mib"] else ""
    print(f"{args.device}: {found['rate']:,.0f} images/s, one worker, {found['pool']} pool "
          f"processes, {found['images']:,} images in {found['seconds']:.1f} s (--send paths, "
          f"SQLite){memory}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
