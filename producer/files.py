"""Walking a directory of images lazily and cutting it into batches capped in count and bytes.

Nothing here holds more than one batch of files in memory, whatever the directory's size.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from worker import defaults


class DirectoryError(ValueError):
    """A directory that cannot be submitted: missing, not a directory, or without images."""


def check_directory(root: Path) -> Path:
    if not root.exists():
        raise DirectoryError(f"directory {str(root)!r} does not exist")
    if not root.is_dir():
        raise DirectoryError(f"{str(root)!r} is not a directory")
    return root.resolve()


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in defaults.IMAGE_SUFFIXES


def safe_name(rel: str) -> str:
    """File names that are not valid UTF-8 cannot be stored as text: escape their bytes."""
    try:
        rel.encode("utf-8")
        return rel
    except UnicodeEncodeError:
        return rel.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


@dataclass
class DirectoryWalk:
    """Iterates ``(absolute path, relative POSIX path)`` of every image file below ``root``.

    Directory symlinks are not followed (no loops); files that are not images by their name
    are counted in ``n_skipped``; directories that cannot be listed are kept in ``unreadable``.
    """

    root: Path
    n_skipped: int = 0
    unreadable: list[str] = field(default_factory=list)

    def __iter__(self) -> Iterator[tuple[str, str]]:
        root = str(self.root)
        stack = [root]
        while stack:
            directory = stack.pop()
            try:
                entries = os.scandir(directory)
            except OSError as e:
                self.unreadable.append(f"{os.path.relpath(directory, root)}: {e.strerror}")
                continue
            with entries:
                for entry in entries:
                    try:
                        is_dir = entry.is_dir(follow_symlinks=False)
                    except OSError:
                        is_dir = False
                    if is_dir:
                        stack.append(entry.path)
                    elif is_image_name(entry.name):
                        rel = Path(os.path.relpath(entry.path, root)).as_posix()
                        yield entry.path, safe_name(rel)
                    else:
                        self.n_skipped += 1


@dataclass
class Batch:
    paths: list[str] = field(default_factory=list)
    blobs: list[bytes | None] = field(default_factory=list)
    errors: list[str | None] = field(default_factory=list)
    n_bytes: int = 0

    def __len__(self) -> int:
        return len(self.paths)

    def add(self, rel: str, data: bytes | None, error: str | None) -> None:
        self.paths.append(rel)
        self.blobs.append(data)
        self.errors.append(error)
        self.n_bytes += len(data or b"")


def read_file(
    path: str, max_bytes: int = defaults.MAX_FILE_BYTES
) -> tuple[bytes | None, str | None]:
    """The file's bytes, or ``None`` and the reason it could not be read."""
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        return None, f"file could not be read: {e.strerror or type(e).__name__}"
    if len(data) > max_bytes:
        return None, f"file is larger than {max_bytes} bytes"
    return data, None


def batches(
    files: Iterable[tuple[str, str]],
    max_images: int = defaults.BATCH_SIZE,
    max_bytes: int = defaults.BATCH_BYTES,
) -> Iterator[Batch]:
    """Read files into batches of at most ``max_images`` images and ``max_bytes`` bytes
    (a single file larger than ``max_bytes`` travels alone)."""
    if max_images < 1:
        raise ValueError("a batch must hold at least one image")
    batch = Batch()
    for path, rel in files:
        data, error = read_file(path)
        size = len(data or b"")
        if batch and (len(batch) >= max_images or batch.n_bytes + size > max_bytes):
            yield batch
            batch = Batch()
        batch.add(rel, data, error)
    if batch:
        yield batch
