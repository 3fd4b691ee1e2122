"""Shards beside loose files, on the same images, in the same command (issue 27):

- whole-process ``producer submit --wait`` to two workers, the main set as tar shards of
  10,000 (``producer pack``) against the same images as loose files, in both send modes, and
  the fraction of the shards' rows equal to the loose files' bit for bit (and the largest
  ``prob_sgd`` difference of the others);
- the hand-out with no worker (``--send paths``, and ``--send bytes`` on the main set) of the
  main set and of a large one (its shards hard-linked into ten folders), shards against loose,
  and of the same shards without their index (tars another tool wrote: listed by a scan);
- the worker's read of a batch per image (a shard batch's members against the same loose
  files, in this process), how many times it opens the archive, and how many bytes the
  producer reads listing the shards in paths mode against the images' bytes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import text

from bench import fleet, system
from core import defaults
from core.archive_batches import archive_batches, read_recorded
from core.files import DirectoryWalk, read_batch_below
from core.packing import pack_directory
from core.tar_scan import FileSource
from db.session import dispose_engines, get_engine

PER_SHARD = 10_000
#: What a shard set's marker holds: its shards have the index ``producer pack`` writes.
PACKED = "indexed 1"
COMPARED = "label, pred_l1, pred_l2, pred_sgd, dist_l1, dist_l2, prob_sgd, error"


def shard_set(data_dir: Path, loose: Path) -> Path:
    """``loose`` packed into tar shards of :data:`PER_SHARD` (made once, then reused)."""
    root = data_dir / f"shards-of-{loose.name}"
    marker = root / ".complete"
    if not marker.exists() or marker.read_text() != PACKED:
        if root.exists():
            for p in root.iterdir():
                p.unlink()
            root.rmdir()
        pack_directory(loose, root, PER_SHARD)
        marker.write_text(PACKED)
    return root


def unindexed_shards(data_dir: Path, shards: Path) -> Path:
    """The shards of ``shards`` without their index member: the tars another tool would
    write, which the producer lists by reading every header."""
    root = data_dir / f"{shards.name}-unindexed"
    marker = root / ".complete"
    if marker.exists() and marker.read_text() == PACKED:
        return root
    root.mkdir(parents=True, exist_ok=True)
    for shard in sorted(shards.glob("*.tar")):
        with open(shard, "rb") as f:
            header = f.read(512)
            size = int(header[124:136].split(b"\0", 1)[0] or b"0", 8)
            f.seek(512 + (size + 511) // 512 * 512)
            (root / shard.name).write_bytes(f.read())
    marker.write_text(PACKED)
    return root


def linked_shards(data_dir: Path, shards: Path, copies: int) -> Path:
    """``copies`` folders each holding hard links to every shard of ``shards``."""
    root = data_dir / f"{shards.name}-x{copies}"
    marker = root / ".complete"
    if marker.exists() and marker.read_text() == PACKED:
        return root
    root.mkdir(parents=True, exist_ok=True)
    for i in range(copies):
        folder = root / f"part{i:03d}"
        folder.mkdir(exist_ok=True)
        for shard in sorted(shards.glob("*.tar")):
            if (folder / shard.name).exists():
                (folder / shard.name).unlink()
            os.link(shard, folder / shard.name)
    marker.write_text(PACKED)
    return root


def same_predictions(db_url: str, loose_run: int, shard_run: int) -> tuple[int, int, float]:
    """How many shard members' rows equal their loose file's column for column, of how many,
    and the largest difference of ``prob_sgd`` among those that do not."""
    with get_engine(db_url).connect() as conn:
        rows = {run: {p: tuple(r) for p, *r in conn.execute(text(
            f"SELECT path, {COMPARED} FROM predictions WHERE run_id = :r"), {"r": run})}
            for run in (loose_run, shard_run)}
    dispose_engines()
    loose = rows[loose_run]
    shards = {p.split("/", 1)[1]: r for p, r in rows[shard_run].items()}
    same = sum(1 for p, r in shards.items() if loose.get(p) == r)
    worst = max((abs(r[6] - loose[p][6]) for p, r in shards.items()
                 if p in loose and loose[p] != r and r[6] is not None), default=0.0)
    return same, len(shards), worst


def whole_process(
    loose: Path, shards: Path, env: dict[str, str], work: Path, extra: list[str],
    modes: tuple[str, ...] = ("paths", "bytes"), tail: str = "",
) -> dict[str, float]:
    """One round of ``submit --wait`` of both sets in each of ``modes``: images/s of the
    whole process, and 1.0 where the shards' predictions equal the loose files' (each
    figure's name ending in ``tail``)."""
    out: dict[str, float] = {}
    for mode in modes:
        runs = {}
        for name, directory in (("loose", loose), ("shards", shards)):
            r = system.submit_and_wait(directory, env, work, ["--send", mode, *extra])
            runs[name] = r.run_id
            out[f"submit_{mode}_{name}_wall{tail}"] = r.n_images / (r.wall_seconds or r.seconds)
        same, n, worst = same_predictions(
            env["DIGITSCORE_DATABASE_URL"], runs["loose"], runs["shards"])
        out[f"identical_{mode}_fraction{tail}"] = same / n if n else 0.0
        out[f"prob_sgd_max_difference_{mode}{tail}"] = worst
    return out


def handouts(
    sets: dict[str, Path], broker_url: str, db_url: str, work: Path, extra: list[str],
) -> dict[str, float]:
    """Hand-out rates (images/s, whole process, no worker) of each named set."""
    out: dict[str, float] = {}
    for name, directory in sets.items():
        modes = ("paths", "bytes") if name in ("loose", "shards") else ("paths",)
        for mode in modes:
            h = fleet.handout(directory, mode, broker_url, db_url, work, extra)
            out[f"handout_{mode}_{name}"] = h.rate
            out[f"handout_{mode}_{name}_n"] = h.n_images
    return out


def read_costs(loose: Path, shards: Path, batch: int = defaults.BATCH_SIZE) -> dict[str, float]:
    """us an image of a worker's read of one batch, loose files against a shard's members
    (best of five), the archive opens per shard batch, and the bytes the producer's paths-mode
    listing reads against the images' own bytes."""
    walk = DirectoryWalk(shards.resolve())
    list(walk)
    reads: list[int] = []
    real_read = FileSource.read_at

    def counted(source: FileSource, offset: int, n: int) -> bytes:
        data = real_read(source, offset, n)
        reads.append(len(data))
        return data

    FileSource.read_at = counted  # type: ignore[method-assign, assignment]
    try:
        listed = list(archive_batches(walk, "paths", batch))
    finally:
        FileSource.read_at = real_read  # type: ignore[method-assign]
    records = [b.members for b in listed if b.members is not None]
    image_bytes = sum(w[1] for record in records for w in record["members"])
    first, record = listed[0], records[0]
    rels = [p.split("/", 1)[1] for p in first.paths]
    loose_root, shard_root = str(loose.resolve()), str(shards.resolve())
    opens: list[str] = []
    real_open = os.open

    def counted_open(path: Any, *args: Any, **kwargs: Any) -> int:
        opens.append(str(path))
        return real_open(path, *args, **kwargs)

    os.open = counted_open  # type: ignore[assignment]
    try:
        read_recorded(shard_root, first.paths, record)
    finally:
        os.open = real_open
    return {
        "read_us_loose": _best(lambda: read_batch_below(loose_root, rels)) / len(rels) * 1e6,
        "read_us_shard": _best(
            lambda: read_recorded(shard_root, first.paths, record)) / len(rels) * 1e6,
        # the opens of the archive (core/below.py opens the source directory first)
        "archive_opens_per_batch": float(sum(p != shard_root for p in opens)),
        "listing_bytes_read": float(sum(reads)),
        "listing_image_bytes": float(image_bytes),
    }


def _best(work: Callable[[], object], n: int = 5) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return min(times)
