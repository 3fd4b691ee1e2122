"""Turning the benchmark's rounds into medians, ratios and goals, and printing them."""

from __future__ import annotations

import os
import platform
import statistics
from argparse import Namespace
from typing import Any

from core.text import plural

ROWS = [
    ("system_sqlite", "system: 2 workers, Redis, SQLite (submit --wait)"),
    ("system_sqlite_wall", "  the same, whole producer process as a shell sees it"),
    ("system_postgresql", "system: 2 workers, Redis, PostgreSQL (submit --wait)"),
    ("default_bytes_wall", "1 default worker, submit --wait, whole processes"),
    ("default_paths_wall", "  the same, --send paths"),
    ("one_worker", "system: 1 worker, Redis, SQLite (submit --wait)"),
    ("one_worker_full", "1 worker, its queue full (producer done first)"),
    ("one_worker_busy", "  the same worker's pool process while busy (task time)"),
    ("plain_script", "plain script: NumPy, Pillow per file, batches of 1,024, CSV"),
    ("plain_script_wall", "  the same, whole process as a shell sees it"),
    ("naive_celery", "naive Celery: 1 task per image, 2 processes"),
    ("limit_fast", "decode+score limit, 1 process, fast decoder"),
    ("limit_beside_worker", "  the same, just before and after the queue-full run"),
    ("limit_previous", "  the same, the previous decoder (libspng, inflated twice)"),
    ("limit_pillow", "decode+score limit, 1 process, Pillow"),
]
#: The decode+score limit's split, microseconds an image.
SPLIT = [("fast", "fast decoder"), ("previous", "previous decoder")]

#: (name, numerator, denominator, goal): the ratio of two rates must reach the goal; a goal
#: of ``None`` is a ratio printed for information.
GOALS = [
    ("end to end (SQLite) / plain script", "system_sqlite", "plain_script", 2.0),
    ("end to end (PostgreSQL) / plain script", "system_postgresql", "plain_script", 2.0),
    ("whole processes: submit --wait (SQLite) / plain script", "system_sqlite_wall",
     "plain_script_wall", 3.0),
    ("whole: 1 default worker, --send bytes / plain script", "default_bytes_wall",
     "plain_script_wall", 4.0),
    ("whole: 1 default worker, --send paths / plain script", "default_paths_wall",
     "plain_script_wall", 4.0),
    ("decode+score limit: fast decoder / previous decoder", "limit_fast", "limit_previous",
     2.0),
    ("end to end (SQLite) / naive Celery", "system_sqlite", "naive_celery", 50.0),
    ("end to end (PostgreSQL) / naive Celery", "system_postgresql", "naive_celery", 50.0),
    ("one worker, queue full / limit measured beside it", "one_worker_full",
     "limit_beside_worker", 0.70),
    ("one worker, queue full / the round's limit", "one_worker_full", "limit_fast", None),
    ("one worker fed by submit --wait / limit", "one_worker", "limit_fast", None),
    ("one worker while busy / limit measured beside it", "one_worker_busy",
     "limit_beside_worker", None),
]
MEMORY = [("producer_mib", "producer"), ("worker_pool_mib", "worker pool process"),
          ("worker_main_mib", "worker main process")]
MEMORY_GOAL = 1.3
#: The fleet figures (bench/fleet.py): name, label, unit.
FLEET = [
    ("handout_bytes", "hand-out, main set, --send bytes", "images/s"),
    ("handout_paths", "hand-out, main set, --send paths", "images/s"),
    ("handout_bytes_large", "hand-out, large set, --send bytes", "images/s"),
    ("handout_paths_large", "hand-out, large set, --send paths", "images/s"),
    ("steady_bytes", "  steady rate (large - main), --send bytes", "images/s"),
    ("steady_paths", "  steady rate (large - main), --send paths", "images/s"),
    ("fixed_bytes", "  fixed cost of the process, --send bytes", "s"),
    ("fixed_paths", "  fixed cost of the process, --send paths", "s"),
    ("redis_peak_mib_bytes", "Redis peak, main set all queued, --send bytes", "MiB"),
    ("redis_peak_mib_paths", "Redis peak, main set all queued, --send paths", "MiB"),
    ("one_image_s", "one-image submit --wait to running workers", "s"),
]
#: --send paths must hand out at least this many times as fast as --send bytes: judged on
#: the large set, a fleet-sized run, where the process's fixed cost (the same in both modes)
#: no longer hides what each mode does per image.
HANDOUT_GOAL = 4.0
#: A one-image submit --wait must take at most this long (seconds).
ONE_IMAGE_GOAL = 1.0
#: The issue's set size: at least 100,000 images; smaller runs are smoke runs.
FULL_SIZE = 100_000


def machine(device: str) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        device = f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, "
            f"torch {torch.__version__}, device {device}, load average {load}")


def _median_ratio(rates: dict[str, list[float]], top: str, bottom: str) -> float | None:
    if top not in rates or bottom not in rates:
        return None
    pairs = zip(rates[top], rates[bottom], strict=False)
    return statistics.median(a / b for a, b in pairs)


def summarise(
    rates: dict[str, list[float]],
    memory: dict[int, dict[str, float]],
    args: Namespace,
    machine_text: str,
    seconds: float,
    fleet: dict[str, list[float]] | None = None,
) -> dict[str, Any]:
    goals = []
    for name, top, bottom, goal in GOALS:
        ratio = _median_ratio(rates, top, bottom)
        goals.append({"goal": name, "ratio": ratio, "target": goal,
                      "met": None if ratio is None or goal is None else ratio >= goal})
    small, large = args.memory
    mem = []
    for key, name in MEMORY:
        a, b = memory[small].get(key), memory[large].get(key)
        ratio = b / a if a and b else None
        mem.append({"process": name, "small_mib": a, "large_mib": b, "ratio": ratio,
                    "met": None if ratio is None else ratio <= MEMORY_GOAL})
    return {
        "machine": machine_text,
        "images": args.images,
        "naive_images": args.naive_images,
        "repeat": args.repeat,
        "device": args.device,
        "batch_size": getattr(args, "batch_size", None),
        "seconds": seconds,
        "rates": rates,
        "medians": {k: statistics.median(v) for k, v in rates.items()},
        "goals": goals,
        "memory_sizes": [small, large],
        "memory": mem,
        "fleet": _fleet(fleet or {}),
    }


def _fleet(figures: dict[str, list[float]]) -> dict[str, Any]:
    figures = {**figures, **_steady(figures)}
    medians = {k: statistics.median(v) for k, v in figures.items() if v}
    ratio = _median_ratio(figures, "handout_paths_large", "handout_bytes_large")
    one = medians.get("one_image_s")
    return {
        "figures": figures,
        "medians": medians,
        "handout_ratio": ratio,
        "handout_ratio_main": _median_ratio(figures, "handout_paths", "handout_bytes"),
        "handout_ratio_steady": _median_ratio(figures, "steady_paths", "steady_bytes"),
        "handout_met": None if ratio is None else ratio >= HANDOUT_GOAL,
        "one_image_met": None if one is None else one <= ONE_IMAGE_GOAL,
    }


def _steady(figures: dict[str, list[float]]) -> dict[str, list[float]]:
    """Per round and mode, the steady hand-out rate and the fixed cost, from the round's
    two hand-outs (``bench.fleet.steady_rate``)."""
    from bench.fleet import MODES, steady_rate

    out: dict[str, list[float]] = {}
    for mode in MODES:
        keys = [f"handout_{mode}", f"handout_{mode}_n", f"handout_{mode}_large",
                f"handout_{mode}_large_n"]
        if not all(k in figures for k in keys):
            continue
        for rate, n, rate_large, n_large in zip(*(figures[k] for k in keys), strict=True):
            try:
                steady, fixed = steady_rate((int(n), n / rate),
                                            (int(n_large), n_large / rate_large))
            except ValueError:  # a noisy round: the larger run was no slower; left out
                continue
            out.setdefault(f"steady_{mode}", []).append(steady)
            out.setdefault(f"fixed_{mode}", []).append(fixed)
    return out


def _yes(met: bool | None) -> str:
    return "n/a" if met is None else ("met" if met else "NOT met")


def format_results(r: dict[str, Any]) -> str:
    n_runs = r["repeat"]
    lines = [
        "",
        f"digitscore throughput: {r['images']:,} real 28x28 digit PNGs in 10 class folders "
        f"(naive Celery: {r['naive_images']:,})",
        f"machine: {r['machine']}",
        f"medians of {plural(n_runs, 'interleaved round')}; "
        f"batch size {r['batch_size'] or 'default'}; "
        f"whole benchmark {r['seconds']:.0f} s",
        "",
        f"{'measurement':56s} {'images/s':>10s}   all rounds",
    ]
    for key, name in ROWS:
        if key in r["medians"]:
            every = ", ".join(f"{x:,.0f}" for x in r["rates"][key])
            lines.append(f"{name:56s} {r['medians'][key]:10,.0f}   {every}")
    for key, name in SPLIT:
        if f"decode_us_{key}" in r["medians"]:
            d, s = r["medians"][f"decode_us_{key}"], r["medians"][f"score_us_{key}"]
            label = f"  {name}: decode / score, us an image"
            lines.append(f"{label:56s} {d:10.2f}   / {s:.2f}")
    lines += ["", f"{'goal (median of per-round ratios)':56s} {'ratio':>10s}   target"]
    if r["images"] < FULL_SIZE:
        lines.append(f"(a smoke run of {r['images']:,} images, a batch or two per run: the goals "
                     f"are judged on {FULL_SIZE:,})")
    for g in r["goals"]:
        ratio = "n/a" if g["ratio"] is None else f"{g['ratio']:.2f}"
        target = "(information)" if g["target"] is None else (
            f">= {g['target']:g}: {_yes(g['met'])}")
        lines.append(f"{g['goal']:56s} {ratio:>10s}   {target}")
    small, large = r["memory_sizes"]
    lines += ["", f"{'peak RSS (VmHWM), MiB':31s} {small:>11,} files {large:>11,} files"
              f"   ratio   target <= {MEMORY_GOAL:g}"]
    for m in r["memory"]:
        a = "n/a" if m["small_mib"] is None else f"{m['small_mib']:.1f}"
        b = "n/a" if m["large_mib"] is None else f"{m['large_mib']:.1f}"
        ratio = "n/a" if m["ratio"] is None else f"{m['ratio']:.2f}"
        lines.append(f"{m['process']:31s} {a:>17s} {b:>17s}   {ratio:>5s}   {_yes(m['met'])}")
    lines += _format_fleet(r.get("fleet") or {})
    return "\n".join(lines)


def _format_fleet(f: dict[str, Any]) -> list[str]:
    medians = f.get("medians") or {}
    if not medians:
        return []
    lines = ["", f"{'fleet (whole processes)':56s} {'median':>10s}   all rounds"]
    for key, name, unit in FLEET:
        if key in medians:
            fmt = "{:,.2f}" if unit == "s" else ("{:,.1f}" if unit == "MiB" else "{:,.0f}")
            every = ", ".join(fmt.format(x) for x in f["figures"][key])
            lines.append(f"{name + ' (' + unit + ')':56s} {fmt.format(medians[key]):>10s}   "
                         f"{every}")
    for key, label in (("handout_ratio_main", "hand-out paths / bytes, main set"),
                       ("handout_ratio_steady", "hand-out paths / bytes, steady rates")):
        if f.get(key) is not None:
            lines.append(f"{label:56s} {f[key]:10.2f}   (information)")
    if f.get("handout_ratio") is not None:
        lines.append(f"{'hand-out paths / bytes, large set':56s} "
                     f"{f['handout_ratio']:10.2f}   >= {HANDOUT_GOAL:g}: {_yes(f['handout_met'])}")
    if "one_image_s" in medians:
        lines.append(f"{'one-image submit --wait (s)':56s} {medians['one_image_s']:10.2f}   "
                     f"<= {ONE_IMAGE_GOAL:g}: {_yes(f['one_image_met'])}")
    return lines
