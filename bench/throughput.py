"""Throughput of digitscore against what users would write instead, in one command.

    python -m bench.throughput [--quick] [--repeat N] [--device cpu|cuda:0] [--data-dir DIR]

On a generated set of real digit PNGs in ten class folders (cached in --data-dir), measures
images/second of: the system end to end (two ``worker`` processes, Redis, SQLite and then
PostgreSQL, ``producer submit --wait`` from its first file read until the run is done, and
as the whole process a shell sees, against the plain script's whole process too); one
default ``worker`` (a pool process per core) fed by ``submit --wait`` with ``--send bytes``
and ``--send paths``, whole processes; one worker alone; the lean plain script
(bench/plain_script.py: NumPy and Pillow); naive Celery with one task per image
(bench/naive_celery.py, on a subset); the decode-and-score limit of one process with Pillow,
with the fast decoder and with the previous one (bench/previous_decode.py), each with its
split into decoding and scoring. Then the peak memory of the producer and of a worker at two
directory sizes. Then the fleet figures (bench/fleet.py): the producer's hand-out rate
with no worker, ``--send bytes`` and ``--send paths``, whole process, of the main set and of
a large one (``--handout-images``, ten times the main set: a fleet-sized run), and from the
two the steady rate and the fixed cost of the process; Redis's peak memory meanwhile (every
batch queued); and the whole-process wall time of a one-image ``submit --wait`` to running
workers. The measurements are interleaved, round by round,
and every ratio is the median of the ratios of the rounds, so that a noisy machine affects
both sides alike.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: the project root is the parent folder
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import (  # noqa: E402
    common,
    dataset,
    fleet,
    previous_decode,
    report,
    runners,
    shards,
    slow_fs,
    system,
)
from core import defaults, fast_decode, images, scoring  # noqa: E402
from core.text import plural  # noqa: E402

DEFAULT_DATA_DIR = Path(tempfile.gettempdir()) / "digitscore-bench"
SIZES = {"images": 100_000, "naive": 2_000, "memory": (10_000, 200_000), "repeat": 3,
         "handout": 1_000_000}
QUICK = {"images": 3_000, "naive": 200, "memory": (1_000, 4_000), "repeat": 1,
         "handout": 30_000}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a small smoke run (about a minute)")
    p.add_argument("--repeat", type=int, help="rounds; every figure is a median (default 3)")
    p.add_argument("--images", type=int, help="images in the main set (default 100,000)")
    p.add_argument("--handout-images", type=int, help="images in the fleet's large hand-out "
                   "(default 1,000,000: hard links to the main set's files)")
    p.add_argument("--naive-images", type=int, help="images for naive Celery (default 2,000)")
    p.add_argument("--memory-sizes", help="two directory sizes for peak memory "
                   "(default 10000,200000)")
    p.add_argument("--device", default="cpu", help="cpu or cuda:N, for workers and scoring")
    p.add_argument("--batch-size", type=int,
                   help="producer submit --batch-size (default: the producer's own default)")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR,
                   help=f"where the image sets are cached (default {DEFAULT_DATA_DIR})")
    p.add_argument("--broker-url", default="redis://127.0.0.1:6379/8")
    p.add_argument("--postgres-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres",
                   help="an admin URL: a fresh database is created and dropped")
    p.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    p.add_argument("--shards-only", action="store_true",
                   help="only the shards-against-loose-files figures (bench/shards.py), "
                   "with the lean plain script on the loose files beside them")
    p.add_argument("--open-latency-ms", type=float,
                   help="with --shards-only: also run submit --send paths --wait on both sets "
                   "seen through bench/slow_fs.py, whose every open waits this long (needs FUSE)")
    args = p.parse_args(argv)
    sizes = QUICK if args.quick else SIZES
    args.repeat = args.repeat or sizes["repeat"]
    args.images = args.images or sizes["images"]
    args.naive_images = args.naive_images or sizes["naive"]
    args.handout_images = args.handout_images or sizes["handout"]
    if args.memory_sizes:
        small, large = (int(x) for x in args.memory_sizes.split(","))
        args.memory = (small, large)
    else:
        args.memory = sizes["memory"]
    return args


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


@contextmanager
def workers(
    n: int, db_url: str, clf: Any, args: argparse.Namespace, work: Path,
    concurrency: int | None = 1,
) -> Iterator[tuple[system.WorkerSet, dict[str, str]]]:
    """``n`` workers on a queue of their own, scoring into ``db_url`` (model stored there)."""
    common.store_model(db_url, clf)
    queue = f"bench-{uuid.uuid4().hex[:8]}"
    env = system.service_env(args.broker_url, queue, db_url)
    try:
        with system.WorkerSet(n, args.device, env, work, concurrency) as ws:
            yield ws, env
    finally:
        system.delete_queue(args.broker_url, queue)


def measure_rounds(
    args: argparse.Namespace, work: Path, main_set: Path, clf: Any, model_npz: Path
) -> dict[str, list[float]]:
    """Every throughput, ``args.repeat`` times, interleaved; images/second per round."""
    paths = dataset.image_paths(main_set)
    blobs = [p.read_bytes() for p in paths]
    step = max(1, len(paths) // args.naive_images)
    naive_paths = paths[::step][: args.naive_images]
    rates: dict[str, list[float]] = {}
    model_url = common.sqlite_url(work / "model.db")
    model_id = common.store_model(model_url, clf)
    batch = args.batch_size or defaults.BATCH_SIZE  # as producer submit cuts batches
    with ExitStack() as stack:
        sets: dict[str, tuple[system.WorkerSet, dict[str, str]]] = {}
        log("starting workers: 2 on SQLite, 1 default on SQLite, 1 on SQLite, 2 on PostgreSQL")
        sets["system_sqlite"] = stack.enter_context(
            workers(2, common.sqlite_url(work / "e2e.db"), clf, args, work))
        sets["default_worker"] = stack.enter_context(
            workers(1, common.sqlite_url(work / "default.db"), clf, args, work, None))
        sets["one_worker"] = stack.enter_context(
            workers(1, common.sqlite_url(work / "one.db"), clf, args, work))
        if common.postgres_reachable(args.postgres_url):
            pg_url = stack.enter_context(common.postgres_database(args.postgres_url))
            sets["system_postgresql"] = stack.enter_context(workers(2, pg_url, clf, args, work))
        else:
            log(f"PostgreSQL at {args.postgres_url} not reachable: skipped")

        def limit() -> float:
            return runners.decode_score_rate(
                blobs, clf, args.device, fast_decode.decode_images, batch)

        steps: list[Callable[[], dict[str, float]]] = [
            lambda: {"limit_pillow": runners.decode_score_rate(
                blobs, clf, args.device, images.decode_each, batch)},
            lambda: _limit_split(blobs, clf, args.device, batch),
            lambda: _plain_rates(main_set, model_npz, work),
            lambda: {"naive_celery": _rate(runners.run_naive_celery(
                naive_paths, model_url, model_id, work, args.broker_url, args.device))},
        ]
        for name, (ws, env) in sets.items():
            steps.append(lambda name=name, ws=ws, env=env: _system_rates(
                name, ws, env, main_set, work, args, limit))
        for r in range(args.repeat):
            for step in steps:
                for name, rate in step().items():
                    rates.setdefault(name, []).append(rate)
                    unit = "us an image" if "_us_" in name else "images/s"
                    log(f"round {r + 1}/{args.repeat}: {name:18s} {rate:10,.1f} {unit}")
    return rates


def _rate(result: tuple[int, float]) -> float:
    return result[0] / result[1]


def _limit_split(blobs: list[bytes], clf: Any, device: str, batch: int) -> dict[str, float]:
    """The decode+score limit with the fast decoder and, right after it in the same process,
    with the previous decoder and scoring (when pyspng is installed), each with its split."""
    out: dict[str, float] = {}
    ways: list[tuple[str, runners.Decoder, runners.Scorer]] = [
        ("fast", fast_decode.decode_images, scoring.score_stack)]
    if previous_decode.pyspng is not None:
        ways.append(("previous", previous_decode.decode_images, previous_decode.score_stack))
    else:
        log("pyspng is not installed: the previous decoder is not measured")
    for name, decoder, scorer in ways:
        split = runners.decode_score_split(blobs, clf, device, decoder, batch, scorer)
        out[f"limit_{name}"] = split["rate"]
        out[f"decode_us_{name}"] = split["decode_us"]
        out[f"score_us_{name}"] = split["score_us"]
    return out


def _plain_rates(root: Path, model_npz: Path, work: Path) -> dict[str, float]:
    """The plain script's rate from its first file listed, and as a shell sees it (the whole
    process: its imports and model loading too)."""
    n, seconds, wall = runners.run_plain_script_timed(root, model_npz, work / "plain.csv")
    return {"plain_script": n / seconds, "plain_script_wall": n / wall}


def _system_rates(
    name: str,
    ws: system.WorkerSet,
    env: dict[str, str],
    root: Path,
    work: Path,
    args: argparse.Namespace,
    limit: Callable[[], float],
) -> dict[str, float]:
    """One ``submit --wait`` run. For the single worker, also its rate with its queue full
    (the producer done before the clock starts, see ``system.submit_then_release``) and,
    from that run, its rate while busy: the time its pool process spent in tasks. The
    decode-and-score ``limit`` is measured again right before and right after the queue-full
    run, and their mean is the limit it is compared with: on this noisy machine the limit
    moved by a third within minutes, and the round's own limit is measured minutes earlier."""
    extra = ["--batch-size", str(args.batch_size)] if args.batch_size else []
    if name == "default_worker":  # loose files in both send modes, whole processes
        rates = {}
        for mode in fleet.MODES:
            result = system.submit_and_wait(root, env, work, [*extra, "--send", mode])
            rates[f"default_{mode}"] = result.rate
            rates[f"default_{mode}_wall"] = result.n_images / (result.wall_seconds or 1)
        return rates
    result = system.submit_and_wait(root, env, work, extra)
    rates = {name: result.rate}
    if result.wall_seconds:
        rates[f"{name}_wall"] = result.n_images / result.wall_seconds
    if name == "one_worker":
        limit_before = limit()
        before = len(ws.task_seconds())
        full = system.submit_then_release(root, env, work, args.broker_url, extra)
        limit_after = limit()
        rates["one_worker_full"] = full.rate
        rates["one_worker_busy"] = full.n_images / sum(ws.task_seconds()[before:])
        rates["limit_beside_worker"] = (limit_before + limit_after) / 2
    return rates


def measure_memory(args: argparse.Namespace, work: Path, clf: Any) -> dict[int, dict[str, float]]:
    """Peak RSS of the producer and of a worker (fresh processes) for each directory size."""
    out: dict[int, dict[str, float]] = {}
    for n in args.memory:
        root = dataset.image_set(args.data_dir, n, args.images)
        db = work / f"memory-{n}.db"
        extra = ["--batch-size", str(args.batch_size)] if args.batch_size else []
        with workers(2, common.sqlite_url(db), clf, args, work) as (ws, env):
            result = system.submit_and_wait(root, env, work, extra)
            out[n] = {"producer_mib": result.producer_peak_mib or 0.0, **ws.peak_memory(),
                      "rate": result.rate}
        log(f"memory at {n:,} files: " + ", ".join(f"{k} {v:,.1f}" for k, v in out[n].items()))
    return out


def measure_fleet(
    args: argparse.Namespace, work: Path, sets: tuple[Path, Path], clf: Any
) -> dict[str, list[float]]:
    """Hand-out rate (images/s) per ``--send`` mode of the main set and of the large one,
    Redis's peak (MiB the main set's run holds), and the one-image ``submit --wait``
    (seconds, median of three per round), ``args.repeat`` rounds."""
    out: dict[str, list[float]] = {}
    db = common.sqlite_url(work / "fleet.db")
    extra = ["--batch-size", str(args.batch_size)] if args.batch_size else []
    main_set, large_set = sets
    image = dataset.image_paths(main_set)[0]
    with workers(2, db, clf, args, work) as (_ws, env):
        for r in range(args.repeat):
            for mode in fleet.MODES:
                for suffix, directory in (("", main_set), ("_large", large_set)):
                    h = fleet.handout(directory, mode, args.broker_url, db, work, extra)
                    out.setdefault(f"handout_{mode}{suffix}", []).append(h.rate)
                    out.setdefault(f"handout_{mode}{suffix}_n", []).append(h.n_images)
                    if not suffix:
                        out.setdefault(f"redis_peak_mib_{mode}", []).append(
                            h.redis_bytes / 2**20)
                    log(f"round {r + 1}/{args.repeat}: hand-out --send {mode:5s} "
                        f"{h.n_images:9,} images {h.rate:10,.0f} images/s ({h.seconds:.2f} s), "
                        f"Redis holds {h.redis_bytes / 2**20:,.1f} MiB of it")
            one = common.median([fleet.one_image_seconds(image, env, work) for _ in range(3)])
            out.setdefault("one_image_s", []).append(one)
            log(f"round {r + 1}/{args.repeat}: one-image submit --wait {one:.2f} s")
    return out


def measure_shards(
    args: argparse.Namespace, work: Path, sets: tuple[Path, Path], clf: Any
) -> dict[str, list[float]]:
    """bench/shards.py's figures, ``args.repeat`` rounds interleaved: the main set as shards
    of 10,000 against its loose files and against the lean plain script on the loose files,
    and the large set's hand-out against shards hard-linked ten times."""
    main_set, large_set = sets
    shard_dir = shards.shard_set(args.data_dir, main_set)
    large_shards = shards.linked_shards(args.data_dir, shard_dir, 10)
    unindexed = shards.unindexed_shards(args.data_dir, shard_dir)
    log(f"shards ready: {shard_dir}, {large_shards}, {unindexed}")
    extra = ["--batch-size", str(args.batch_size)] if args.batch_size else []
    out: dict[str, list[float]] = {}
    db = common.sqlite_url(work / "shards.db")
    model_npz = common.export_model(clf, work / "model.npz")  # for the plain script
    with workers(2, db, clf, args, work) as (_ws, env):
        for r in range(args.repeat):
            figures = shards.read_costs(main_set, shard_dir)
            figures |= shards.handouts(
                {"loose": main_set, "shards": shard_dir, "loose_large": large_set,
                 "shards_large": large_shards, "shards_unindexed": unindexed},
                args.broker_url, db, work, extra)
            figures |= shards.whole_process(main_set, shard_dir, env, work, extra)
            figures |= _plain_rates(main_set, model_npz, work)
            if args.open_latency_ms is not None:
                with slow_fs.mounted(args.data_dir, work / "slow",
                                     args.open_latency_ms / 1000) as slow:
                    figures |= shards.whole_process(
                        slow / main_set.name, slow / shard_dir.name, env, work, extra,
                        ("paths",), "_slow_opens")
            for name, value in figures.items():
                out.setdefault(name, []).append(value)
                log(f"round {r + 1}/{args.repeat}: {name:32s} {value:14,.2f}")
    return out


def shards_main(args: argparse.Namespace) -> None:
    """``--shards-only``: the main and large sets, a model, and bench/shards.py's figures."""
    main_set = dataset.image_set(args.data_dir, args.images, args.images)
    large_set = dataset.image_set(args.data_dir, args.handout_images, args.images)
    clf = common.train_classifier()
    work = Path(tempfile.mkdtemp(prefix="digitscore-bench-"))
    try:
        figures = measure_shards(args, work, (main_set, large_set), clf)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = {name: common.median(values) for name, values in figures.items()}
    for a, b in (("submit_paths_shards_wall", "submit_paths_loose_wall"),
                 ("submit_bytes_shards_wall", "submit_bytes_loose_wall"),
                 ("handout_paths_shards", "handout_paths_loose"),
                 ("handout_paths_shards_large", "handout_paths_loose_large"),
                 ("handout_paths_shards_unindexed", "handout_paths_loose"),
                 ("read_us_loose", "read_us_shard"),
                 ("submit_paths_shards_wall_slow_opens", "submit_paths_loose_wall_slow_opens"),
                 ("submit_paths_shards_wall", "plain_script_wall"),
                 ("submit_bytes_shards_wall", "plain_script_wall"),
                 ("submit_paths_loose_wall", "plain_script_wall")):
        if a not in figures:
            continue
        ratios = [x / y for x, y in zip(figures[a], figures[b], strict=True)]
        summary[f"{a} / {b}"] = common.median(ratios)
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps({"medians": summary, "rounds": figures}, indent=2))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not common.redis_reachable(args.broker_url):
        raise SystemExit(f"Redis at {args.broker_url} is not reachable: start it first")
    if args.shards_only:
        shards_main(args)
        return
    started = time.perf_counter()
    machine = report.machine(args.device)
    log(f"{args.images:,} images, {plural(args.repeat, 'round')}, device {args.device}; {machine}")
    main_set = dataset.image_set(args.data_dir, args.images, args.images)
    for n in args.memory:
        dataset.image_set(args.data_dir, n, args.images)
    large_set = dataset.image_set(args.data_dir, args.handout_images, args.images)
    log(f"image sets ready in {args.data_dir}")
    clf = common.train_classifier()
    work = Path(tempfile.mkdtemp(prefix="digitscore-bench-"))
    try:
        model_npz = common.export_model(clf, work / "model.npz")
        rates = measure_rounds(args, work, main_set, clf, model_npz)
        memory = measure_memory(args, work, clf)
        fleet_figures = measure_fleet(args, work, (main_set, large_set), clf)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results = report.summarise(rates, memory, args, machine, time.perf_counter() - started,
                               fleet_figures)
    print(report.format_results(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
