"""Walking a directory of images lazily and cutting it into batches capped in count and bytes.

Nothing here holds more than one batch of files in memory, whatever the directory's size.

File names are data: a relative path is stored as text exactly as the file system spells it,
except that bytes which are not valid UTF-8 are written as ``\\xNN`` escapes
(:func:`safe_name`; :func:`stored_name` adds a mark in the rare case that the escaped spelling
is also the name of another file). :func:`read_file` finds such a file again from its stored
name, so ``producer resume`` can re-read it.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core import defaults
from core.below import Below, Outside
from core.errors import DirectoryError
from core.text import printable


def check_directory(root: Path) -> Path:
    """``root`` resolved, if it is a directory this process can list and store the name of."""
    if not root.exists():
        raise DirectoryError(f"directory {str(root)!r} does not exist")
    if not root.is_dir():
        raise DirectoryError(f"{str(root)!r} is not a directory")
    resolved = root.resolve()
    try:
        str(resolved).encode("utf-8")
    except UnicodeEncodeError:
        raise DirectoryError(
            f"the path '{printable(safe_name(str(resolved)))}' is not valid UTF-8, so a run "
            "cannot record where its files are: rename the directory, or submit a directory "
            "whose own path is valid UTF-8 (names inside it may be anything)"
        ) from None
    try:
        with os.scandir(resolved):
            pass
    except OSError as e:
        raise DirectoryError(
            f"directory {str(resolved)!r} cannot be listed: {e.strerror or type(e).__name__}"
        ) from None
    return resolved


def is_image_name(name: str) -> bool:
    """Whether the name ends in an image suffix, as ``os.path.splitext`` tells suffixes
    (leading dots start no suffix: ``.png`` is a hidden file named png); spelled out, since
    the walk asks it of every file."""
    dot = name.rfind(".")
    if dot <= 0:
        return False
    suffix = name[dot:]
    suffixes = defaults.IMAGE_SUFFIXES
    if suffix not in suffixes and suffix.lower() not in suffixes:
        return False
    return name[0] != "." or name[:dot].lstrip(".") != ""


def safe_name(rel: str) -> str:
    """File names that are not valid UTF-8 cannot be stored as text: escape their bytes."""
    if rel.isascii():  # nearly every name: nothing to escape
        return rel
    try:
        rel.encode("utf-8")
        return rel
    except UnicodeEncodeError:
        return rel.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


# safe_name writes an undecodable byte (always 0x80-0xff) as a backslash, x, two lowercase hex.
_ESCAPED_BYTE = re.compile(rb"\\x([89a-f][0-9a-f])")

#: Appended to an escaped name when a file is really called by the escaped spelling.
NOT_UTF8_MARK = " (name not UTF-8)"


def stored_name(root: str, rel: str) -> str:
    """The text a relative path is stored as: itself, or its :func:`safe_name` escape; and if
    a file below ``root`` is literally named like that escape, the escape plus
    :data:`NOT_UTF8_MARK`, so that two files never share one row."""
    escaped = safe_name(rel)
    if escaped != rel and os.path.lexists(os.path.join(root, escaped)):
        escaped += NOT_UTF8_MARK
    return escaped


def on_disk_name(stored: str) -> str | None:
    """The file system name a :func:`stored_name` result came from, when it differs from it.

    ``None`` when ``stored`` holds no escape, or when unescaping it would not give back a
    name that :func:`safe_name` maps to ``stored`` (then ``stored`` was spelled that way).
    """
    if "\\x" not in stored:
        return None
    escaped = stored.removesuffix(NOT_UTF8_MARK)
    raw = _ESCAPED_BYTE.sub(lambda m: bytes([int(m.group(1), 16)]), os.fsencode(escaped))
    candidate = os.fsdecode(raw)
    if candidate == escaped or safe_name(candidate) != escaped:
        return None
    return candidate


@dataclass
class DirectoryWalk:
    """Iterates ``(absolute path, relative POSIX path)`` of every image file below ``root``.

    Directory symlinks are not followed (no loops, no file seen twice) and are counted in
    ``n_skipped``, as are files that are not images by their name. A subdirectory that cannot
    be listed is yielded itself, as ``"dir/"``, so that it gets an error row (its images cannot
    be known), and is kept in ``unreadable``. Relative paths are given as :func:`stored_name`
    spells them.
    """

    root: Path
    n_skipped: int = 0
    unreadable: list[str] = field(default_factory=list)
    #: (absolute path, relative path) of the archives met (core.archive_batches reads them)
    archives: list[tuple[str, str]] = field(default_factory=list)

    def __iter__(self) -> Iterator[tuple[str, str]]:
        root = str(self.root)
        # Every path below root starts with this; slicing it off is the relative path
        # (pathlib would intern every name it meets: memory that grows with the directory).
        start = len(os.path.join(root, ""))
        stack = [root]
        while stack:
            directory = stack.pop()
            try:
                entries = os.scandir(directory)
            except OSError as e:
                rel_dir = _posix(directory[start:]) or "."
                self.unreadable.append(f"{rel_dir}: {e.strerror}")
                if directory != root:
                    yield directory + os.sep, stored_name(root, rel_dir) + "/"
                continue
            with entries:
                # The walk's inner loop, run once per file: the entry's type comes from the
                # directory listing itself (no stat), and an ASCII name needs no escaping, so
                # it skips the call to stored_name (docs/performance.md, "Simple code
                # against tricks").
                for entry in entries:
                    kind = _kind(entry)
                    if kind == "dir":
                        stack.append(entry.path)
                    elif kind == "dir-link" or not is_image_name(entry.name):
                        archive = entry.name.lower().endswith(defaults.ARCHIVE_SUFFIXES)
                        if kind == "file" and archive:
                            self.archives.append((entry.path, stored_name(root, _posix(
                                entry.path[start:]))))
                        else:
                            self.n_skipped += 1
                    else:
                        path = entry.path
                        rel = path[start:]
                        if not (rel.isascii() and os.sep == "/"):
                            rel = stored_name(root, _posix(rel))
                        yield path, rel


def _posix(rel: str) -> str:
    return rel if os.sep == "/" else rel.replace(os.sep, "/")


def _kind(entry: os.DirEntry[str]) -> str:
    """``"dir"`` (walk into it), ``"dir-link"`` (a symlink to a directory: skip it) or
    ``"file"`` (anything else, including dangling links: reading it says what is wrong)."""
    try:
        if entry.is_dir(follow_symlinks=False):
            return "dir"
        if entry.is_symlink() and entry.is_dir():
            return "dir-link"
    except OSError:  # a symlink loop, a vanished entry: let read_file report it
        pass
    return "file"


@dataclass
class FileBatch:
    """Files read for one batch: relative paths, their bytes (or None) and read errors."""

    paths: list[str] = field(default_factory=list)
    blobs: list[bytes | None] = field(default_factory=list)
    errors: list[str | None] = field(default_factory=list)
    n_bytes: int = 0
    #: an archive batch's class names from WebDataset ``.cls`` members, and its record
    #: (where its members are: core.archives)
    labels: list[str | None] | None = None
    members: dict[str, Any] | None = None

    def add(self, rel: str, data: bytes | None, error: str | None) -> None:
        self.paths.append(rel)
        self.blobs.append(data)
        self.errors.append(error)
        self.n_bytes += len(data or b"")


_FILE_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a named pipe",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


_READ_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0)


def _open(path: str) -> int:
    """Open for reading without blocking (a named pipe with no writer would hang a plain
    ``open``); a stored name with ``\\xNN`` escapes falls back to its on-disk spelling."""
    try:
        return os.open(path, _READ_FLAGS)
    except FileNotFoundError:
        raw = on_disk_name(path)
        if raw is None:
            raise
        return os.open(raw, _READ_FLAGS)


def read_file(
    path: str, max_bytes: int = defaults.MAX_FILE_BYTES
) -> tuple[bytes | None, str | None]:
    """The file's bytes, or ``None`` and the reason it could not be read.

    Only regular files (or symlinks to them) are read; a path ending in ``/`` is a directory
    the walk could not list.
    """
    unlisted = path.endswith(os.sep)
    try:
        fd = _open(path)
    except OSError as e:
        what = "directory could not be listed" if unlisted else "file could not be read"
        return None, f"{what}: {e.strerror or type(e).__name__}"
    return _read_open(fd, unlisted, max_bytes)


def _read_open(fd: int, unlisted: bool, max_bytes: int) -> tuple[bytes | None, str | None]:
    """:func:`read_file`'s answer for the open descriptor ``fd``, which it closes."""
    # Plain os calls on the descriptor: a buffered file object per file costs about as much
    # as the open, stat and read together (docs/performance.md).
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            if unlisted:
                return None, "directory could not be listed"
            kind = _FILE_KINDS.get(stat.S_IFMT(st.st_mode), "not a regular file")
            return None, f"not an image file: {kind}"
        if st.st_size > max_bytes:
            return None, f"file is larger than {max_bytes} bytes"
        # Ask for the size fstat gave and one byte more, never max_bytes (read(n) allocates
        # n bytes up front). Getting exactly that size is the whole file; anything else (a
        # file that grew or shrank since fstat, a /proc file that reports 0) reads on to EOF.
        data = os.read(fd, st.st_size + 1)
        if len(data) != st.st_size:
            data = _read_rest(fd, data, max_bytes)
    except OSError as e:
        return None, f"file could not be read: {e.strerror or type(e).__name__}"
    finally:
        os.close(fd)
    if len(data) > max_bytes:  # it grew after fstat
        return None, f"file is larger than {max_bytes} bytes"
    return data, None


def _read_rest(fd: int, data: bytes, max_bytes: int) -> bytes:
    """``data`` and what follows it up to EOF, stopping once past ``max_bytes``."""
    parts = [data]
    total = len(data)
    while total <= max_bytes:
        more = os.read(fd, max(1, min(1 << 20, max_bytes + 1 - total)))
        if not more:
            break
        parts.append(more)
        total += len(more)
    return b"".join(parts)


def batches(
    files: Iterable[tuple[str, str]],
    max_images: int = defaults.BATCH_SIZE,
    max_bytes: int = defaults.BATCH_BYTES,
) -> Iterator[FileBatch]:
    """Read files into batches of at most ``max_images`` images and ``max_bytes`` bytes
    (a single file larger than ``max_bytes`` travels alone)."""
    if max_images < 1:
        raise ValueError("a batch must hold at least one image")
    batch = FileBatch()
    for path, rel in files:
        data, error = read_file(path)
        size = len(data or b"")
        if batch.paths and (len(batch.paths) >= max_images or batch.n_bytes + size > max_bytes):
            yield batch
            batch = FileBatch()
        batch.add(rel, data, error)
    if batch.paths:
        yield batch


def path_batches(files: Iterable[tuple[str, str]], max_images: int) -> Iterator[FileBatch]:
    """Batches of at most ``max_images`` relative paths, no file read (``--send paths``: the
    workers read them)."""
    if max_images < 1:
        raise ValueError("a batch must hold at least one image")
    batch = FileBatch()
    for _path, rel in files:
        if len(batch.paths) >= max_images:
            yield batch
            batch = FileBatch()
        batch.paths.append(rel)
    if batch.paths:
        yield batch


def read_batch(root: str, paths: Iterable[str]) -> FileBatch:
    """The files of recorded relative paths below ``root``, read as the producer's walk
    reads them."""
    batch = FileBatch()
    for rel in paths:
        data, error = read_file(os.path.join(root, rel))
        batch.add(rel, data, error)
    return batch


#: The read error of a recorded path that leads out of the run's source directory.
OUTSIDE_ROOT = "path is outside the run's source directory"


def read_below(
    root: str, rel: str, max_bytes: int = defaults.MAX_FILE_BYTES, below: Below | None = None
) -> tuple[bytes | None, str | None]:
    """:func:`read_file` of ``rel`` below ``root`` (a resolved directory), refusing a path
    that, its symlinks followed, leads out of ``root``: ``..``, an absolute path, or a link
    out of the directory get the error :data:`OUTSIDE_ROOT`.

    Each component is opened from its parent's descriptor (core/below.py), so a folder
    swapped for a link while the path is read cannot lead out, and a file that vanished
    since the walk gets its own error. ``below`` keeps a batch's folders open from path to
    path.
    """
    if below is None:
        with Below(root) as own:
            return read_below(root, rel, max_bytes, own)
    unlisted = rel.endswith("/")  # a directory the producer's walk could not list
    what = "directory could not be listed" if unlisted else "file could not be read"
    try:
        try:
            fd = below.open(rel, _READ_FLAGS)
        except FileNotFoundError:
            raw = on_disk_name(rel)  # a stored name with \xNN escapes: the file's own bytes
            if raw is None:
                raise
            fd = below.open(raw, _READ_FLAGS)
    except Outside:
        return None, OUTSIDE_ROOT
    except OSError as e:
        return None, f"{what}: {e.strerror or type(e).__name__}"
    except ValueError:  # a NUL byte: no file is called that
        return None, f"{what}: the name holds a NUL byte"
    return _read_open(fd, unlisted, max_bytes)


def read_batch_below(root: str, paths: Iterable[str]) -> FileBatch:
    """:func:`read_below` of each recorded path: a worker reading a ``--send paths`` batch."""
    batch = FileBatch()
    with Below(root) as below:
        for rel in paths:
            data, error = read_below(root, rel, below=below)
            batch.add(rel, data, error)
    return batch


def map_prefix(path: str, mapping: tuple[str, str] | None) -> str:
    """``path`` with its leading ``mapping[0]`` (a whole path prefix) replaced by
    ``mapping[1]`` (``DIGITSCORE_PATH_MAP``); unchanged without a mapping or a match."""
    if mapping is None:
        return path
    source, target = mapping
    if path == source:
        return target
    prefix = os.path.join(source, "")
    if path.startswith(prefix):
        return os.path.join(target, path[len(prefix):])
    return path
