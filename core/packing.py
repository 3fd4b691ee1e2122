"""Packing a directory of class folders into tar shards (``producer pack``).

Each shard is a plain tar that ``producer submit`` scores and WebDataset reads: every image
keeps its relative path as its member name (``7/img0421.png``, so its class folder labels
it), and after it comes a ``.cls`` member under its WebDataset key (``7/img0421.cls``,
holding ``7``), written once for images that share a key. Images of one folder are written
in name order, so the members of a key are adjacent, as WebDataset requires. Each shard
starts with an index of its members (core/shard_index.py), which WebDataset skips and which
lets ``submit`` list the shard without reading its headers one by one. A shard's members are
written to a ``.body`` file first, then the index and that body to a ``.part`` file, which is
renamed when complete, so a shard name always means a whole shard.
"""

from __future__ import annotations

import io
import os
import shutil
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from core import defaults
from core.archives import shard_columns
from core.errors import DirectoryError
from core.files import DirectoryWalk, check_directory, read_file
from core.shard_index import index_member
from core.tar_scan import FileSource

#: Images per shard unless asked otherwise (WebDataset's usual few thousand).
IMAGES_PER_SHARD = 10_000


@dataclass
class Packed:
    """What ``pack`` wrote, and the files it could not read (left out, named here)."""

    shards: list[Path] = field(default_factory=list)
    n_images: int = 0
    unread: list[tuple[str, str]] = field(default_factory=list)


def check_output(out: Path) -> None:
    """``out`` must be new or an empty directory: pack never overwrites."""
    if out.is_symlink() or (out.exists() and (not out.is_dir() or any(out.iterdir()))):
        raise DirectoryError(
            f"{str(out)!r} already exists and is not an empty directory: pack never "
            "overwrites; give a new directory"
        )


def pack_directory(
    src: Path,
    out: Path,
    images_per_shard: int = IMAGES_PER_SHARD,
    on_image: Callable[[], None] | None = None,
) -> Packed:
    """Write every image below ``src`` into tar shards of ``images_per_shard`` in ``out``."""
    if images_per_shard < 1:
        raise ValueError("a shard must hold at least one image")
    root = check_directory(src)
    check_output(out)
    out.mkdir(parents=True, exist_ok=True)
    packed = Packed()
    start = len(os.path.join(str(root), ""))
    shard: tarfile.TarFile | None = None
    in_shard = 0
    keys: set[str] = set()
    for path in _in_folder_order(DirectoryWalk(root)):
        data, error = read_file(path, defaults.MAX_FILE_BYTES)
        name = path[start:].replace(os.sep, "/")
        if data is None:
            packed.unread.append((name, error or "could not be read"))
            continue
        if shard is None or in_shard >= images_per_shard:
            _close(shard, packed)
            shard = _open_shard(out, len(packed.shards))
            in_shard, keys = 0, set()
        _add(shard, name, data, os.stat(path).st_mtime, keys)
        in_shard += 1
        packed.n_images += 1
        if on_image is not None:
            on_image()
    _close(shard, packed)
    return packed


def _in_folder_order(walk: Iterable[tuple[str, str]]) -> Iterator[str]:
    """The walk's paths, each folder's files in name order (a walk lists a folder's files
    together)."""
    folder: str | None = None
    files: list[str] = []
    for path, _rel in walk:
        here = os.path.dirname(path)
        if here != folder:
            yield from sorted(files)
            folder, files = here, []
        files.append(path)
    yield from sorted(files)


def _open_shard(out: Path, index: int) -> tarfile.TarFile:
    body = out / f"shard-{index:06d}.tar.body"
    return tarfile.open(body, "x", format=tarfile.PAX_FORMAT)


def _close(shard: tarfile.TarFile | None, packed: Packed) -> None:
    """The shard's body complete: its index and the body written as the shard."""
    if shard is None:
        return
    shard.close()
    body = Path(str(shard.name))
    whole = body.with_suffix("")  # drops ".body"
    part = whole.with_name(whole.name + ".part")
    with open(body, "rb") as src, open(part, "xb") as dst:
        columns = shard_columns(FileSource(src.fileno()))
        length = os.fstat(src.fileno()).st_size
        dst.write(index_member(columns, length, int(time.time())))
        shutil.copyfileobj(src, dst, 1 << 20)
    os.unlink(body)
    os.rename(part, whole)
    packed.shards.append(whole)


def _add(shard: tarfile.TarFile, name: str, data: bytes, mtime: float, keys: set[str]) -> None:
    """The image, then its key's ``.cls`` member (once per key) when it is in a folder."""
    _write(shard, name, data, mtime)
    folder, _, base = name.rpartition("/")
    dot = base.find(".")
    if folder and dot > 0:
        key = f"{folder}/{base[:dot]}"
        if key not in keys:
            keys.add(key)
            label = folder.rpartition("/")[2]
            _write(shard, key + ".cls", label.encode("utf-8", "surrogateescape"), mtime)


def _write(shard: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), int(mtime), 0o644
    shard.addfile(info, io.BytesIO(data))
