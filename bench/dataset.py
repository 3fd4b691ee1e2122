"""The benchmark's image sets, made from the shipped real digits and cached on disk.

``digits-N/<label>/<i>.png`` holds N files: file ``i`` is shipped digit ``i % 5000`` written
as a PNG the way ``producer sample-data`` writes it, in its label's folder. Larger sets are
hard links to a smaller set's files (same bytes, no disk), which is enough for a file walk
and a memory measurement. A set is reused when its ``.complete`` marker says it is whole.
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from producer.sample_data import load_digits

MARKER = ".complete"


def encoded_digits() -> tuple[list[bytes], np.ndarray]:
    """Every shipped digit as PNG bytes (as ``write_sample`` encodes it) and its label."""
    images, labels = load_digits()
    blobs = []
    for image in images:
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG", optimize=False)
        blobs.append(buf.getvalue())
    return blobs, labels


def _complete(root: Path, n: int) -> bool:
    marker = root / MARKER
    return marker.is_file() and marker.read_text().strip() == str(n)


def _fresh(root: Path) -> None:
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)


def digit_set(data_dir: Path, n: int) -> Path:
    """``data_dir/digits-n``: n real digit PNGs in ten class folders (made once, then reused)."""
    root = data_dir / f"digits-{n}"
    if _complete(root, n):
        return root
    _fresh(root)
    blobs, labels = encoded_digits()
    for label in sorted(set(labels.tolist())):
        (root / str(label)).mkdir()
    for i in range(n):
        k = i % len(blobs)
        (root / str(labels[k]) / f"{i:07d}.png").write_bytes(blobs[k])
    (root / MARKER).write_text(str(n))
    return root


def linked_set(data_dir: Path, n: int, source: Path) -> Path:
    """``data_dir/digits-n``: n names, in the same class folders, hard-linked (cyclically) to
    the files of ``source`` (copied where the file system has no hard links)."""
    root = data_dir / f"digits-{n}"
    if _complete(root, n):
        return root
    files = sorted(p for p in source.rglob("*.png"))
    if not files:
        raise ValueError(f"no PNG files in {source}")
    _fresh(root)
    for i in range(n):
        src = files[i % len(files)]
        dest = root / src.parent.name / f"{i:07d}.png"
        dest.parent.mkdir(exist_ok=True)
        try:
            os.link(src, dest)
        except OSError:
            shutil.copyfile(src, dest)
    (root / MARKER).write_text(str(n))
    return root


def image_set(data_dir: Path, n: int, base: int) -> Path:
    """A set of n images: written out when ``n <= base``, else hard links to the base set."""
    data_dir.mkdir(parents=True, exist_ok=True)
    if n <= base:
        return digit_set(data_dir, n)
    return linked_set(data_dir, n, digit_set(data_dir, base))


def image_paths(root: Path) -> list[Path]:
    """Every PNG below ``root``, in a stable order."""
    return sorted(root.rglob("*.png"))
